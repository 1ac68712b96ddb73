"""Node loss on Ray: from a dead host to the first step after recovery, beside the local scheduler.

One invocation, one training script and recipe (benchmarks/recovery.py's: recipes/tiny_gpt.py,
compute-bound steps, checkpoints every 10 steps), two nodes of one worker plus one spare:

- **local**: `trainctl launch` on simulated nodes; at step 15 every process of node-1 is
  SIGKILLed (as a dead host) — benchmarks/recovery.py's node-loss run;
- **ray**: `trainctl launch --scheduler ray` on a real local Ray cluster (a head with no CPUs,
  three worker raylets of one CPU); at step 15 the Ray node holding the second bundle dies:
  its raylet is removed and every process of the trainctl node on it SIGKILLed at the same
  instant, so the controller sees whichever comes first, the agent's silence or Ray's notice.

Both report the median time from the kill to the first step completed by a worker started after
it (the step log), and whether the run ended with the uninterrupted run's fingerprint. The
floor is the same for both: a new worker's start (torch import, restore) and one step.

    python benchmarks/ray_recovery.py [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recovery

from trainctl.launch import proctree
from trainctl.store import JobStore


def ray_run(
    work: Path, cluster: Any, workers: dict[str, Any], run: int, reference: str
) -> dict[str, Any]:
    job = f"ray-node-loss-{run}"
    log = work / f"{job}.steps"
    recipe = recovery.trainctl_recipe(work, job, log, spares=1, max_steps=recovery.MAX_STEPS)
    storage = work / "store"
    proc = subprocess.Popen(
        recovery.trainctl_cmd(
            "launch",
            str(recipe),
            "--job-id",
            job,
            "--json",
            "--scheduler",
            "ray",
            "--address",
            cluster.address,
            storage=storage,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=recovery.REPO,
    )
    result: dict[str, Any] = {"ok": False, "latency_s": None, "exit": None}
    try:
        if not recovery.wait_for_step(log, recovery.FAULT_STEP, 120):
            result["exit"] = "never reached the fault step"
            return result
        state = JobStore(str(storage)).read_state(job).to_json()
        victim = state["attempts"][0]["nodes"][1]
        pids = recovery.tagged_node(job, victim)
        killed = time.time()
        proctree.signal_all(pids, signal.SIGKILL)
        cluster.remove_node(workers.pop(victim), allow_graceful=False)
        out, _ = proc.communicate(timeout=recovery.RUN_TIMEOUT_S)
        fingerprint = json.loads(out).get("fingerprint") if out.strip() else None
        result["latency_s"] = recovery.first_step_after(log, killed)
        result["exit"] = proc.returncode
        result["ok"] = proc.returncode == 0 and fingerprint == reference
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
        proctree.signal_all(proctree.tagged("TRAINCTL_JOB_ID", job), signal.SIGKILL)
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        workers[node.node_id] = node


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [r["latency_s"] for r in results if r["latency_s"] is not None]
    return {
        "runs": len(results),
        "ok": sum(r["ok"] for r in results),
        "median_s": statistics.median(latencies) if latencies else None,
        "latencies_s": [round(x, 2) for x in latencies],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="ray-recovery-") as tmp:
        work = Path(tmp)
        reference = recovery.trainctl_reference(work)
        local = [recovery.trainctl_run(work, "node_loss", i, reference) for i in range(args.runs)]
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
        )
        try:
            workers = {}
            for _ in range(3):
                node = cluster.add_node(num_cpus=1)
                workers[node.node_id] = node
            cluster.wait_for_nodes()
            ray = [ray_run(work, cluster, workers, i, reference) for i in range(args.runs)]
        finally:
            cluster.shutdown()
    figures = {"local": summary(local), "ray": summary(ray)}
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print("node loss -> first step after recovery (median over runs; fingerprint-checked)")
    for name, figure in figures.items():
        median = figure["median_s"]
        shown = "-" if median is None else f"{median:.2f} s"
        print(
            f"  {name:6s} {shown:>9s}  ok {figure['ok']}/{figure['runs']}  {figure['latencies_s']}"
        )
    if figures["local"]["median_s"] and figures["ray"]["median_s"]:
        ratio = figures["ray"]["median_s"] / figures["local"]["median_s"]
        print(f"  ray / local: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
