"""Recovery: how long a failure idles the job, and how often recovery works — trainctl vs torchrun.

One invocation, one training script (recipes/tiny_gpt.py, small config, async checkpoints every
10 steps to local disk, identical for every contender), two simulated nodes of one worker each:

1. **Worker crash** (SIGKILL of one worker mid-run) and **node loss** (SIGKILL of every process of
   one node, as a dead host): for each contender, the success rate over N runs (the job
   reaches its last step and exits 0; trainctl runs must also end with the uninterrupted
   run's fingerprint) and the median time from the kill to the first step completed after
   the restart (read from the step log the script writes: `TRAINCTL_STEP_LOG`).
   Contenders: `trainctl launch` (node loss: one spare node; the fault injected with `--fault`)
   and plain torchrun with two agents on a c10d rendezvous, `--max-restarts=3`, with torchrun's
   default rendezvous settings and with the tuned ones trainctl uses (node loss: `--nnodes=1:2`,
   the node that does not host the rendezvous store is the one killed — torchrun's best case).
2. **Goodput** over a long run (default 10 minutes) with a node failure every 2 minutes, for
   trainctl (one spare; the killed node comes back after its exclusion expires) and for
   plain tuned torchrun (the killed agent is replaced at once by a fresh one, as a scheduler
   would): goodput = steps reached × the run's median step time / wall time.

Targets (issue 5): node loss ≤ 3 s, worker crash ≤ 2.5 s, 100% success, goodput ≥ 95%.

    python benchmarks/recovery.py [--runs 20] [--peer-runs 5] [--goodput-minutes 10]
                                  [--failure-every 120] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trainctl.launch import proctree
from trainctl.store import JobStore

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "recipes" / "tiny_gpt.py"
CONFIG = {
    "vocab": 256,
    "dim": 128,
    "layers": 2,
    "heads": 4,
    "seq_len": 32,
    "batch_size": 8,
    "lr": 0.003,
    "steps": 1_000_000,
}
"""Steps are compute (forward, backward, optimizer on 2 cores), not sleep: per-step overhead
shows in the goodput."""
CHECKPOINT = {"interval_steps": 10, "keep_last": 2}
TRAINCTL_CHECKPOINT: dict[str, Any] = {}
"""trainctl's additions to the checkpoint section (`--memory`); torchrun peers get none."""
TUNED_RDZV = (
    "join_timeout=20,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,"
    "close_timeout=5"
)
"""torchrun's rendezvous as a careful user tunes it: trainctl's keep-alive settings, and a join
timeout of 20 s (its default, 600 s, and the 120 s used before, idle the job that long when a
round waits for a node that will not come)."""
FAULT_STEP = 15
GOODPUT_REFERENCE_STEPS = 1000
"""Goodput's yardstick: the median step of an uninterrupted run this long."""
SCENARIOS = ("worker_crash", "node_loss", "node_freeze")
"""SIGKILL of one worker; SIGKILL of every process of a node; SIGSTOP of every process of a
node (a host gone silent: no FIN). trainctl runs with one spare for the node faults."""
MAX_STEPS = 40
RUN_TIMEOUT_S = 150.0
TARGETS = {
    "node_loss_s": 3.0,
    "node_freeze_s": 5.0,
    "worker_crash_s": 2.5,
    "success_rate": 1.0,
    "goodput": 0.95,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_steps(path: Path) -> list[tuple[float, int, int]]:
    """(time, pid, step) per line of a step log."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                rows.append((float(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def first_step_after(log: Path, killed_at: float) -> float | None:
    """Seconds from the kill to the first step completed by a process started after it."""
    rows = read_steps(log)
    before = {pid for t, pid, _ in rows if t <= killed_at}
    after = [t for t, pid, _ in rows if t > killed_at and pid not in before]
    return min(after) - killed_at if after else None


def wait_for_step(log: Path, step: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s >= step for _, _, s in read_steps(log)):
            return True
        time.sleep(0.05)
    return False


# -- trainctl -------------------------------------------------------------------------------
def trainctl_recipe(
    directory: Path, name: str, log: Path, *, spares: int, max_steps: int | None, **extra: Any
) -> Path:
    recipe: dict[str, Any] = {
        "name": name,
        "script": str(SCRIPT),
        "nodes": 2,
        "spare_nodes": spares,
        "seed": 0,
        "config": CONFIG,
        "checkpoint": CHECKPOINT,
        "env": {"TRAINCTL_STEP_LOG": str(log)},
        **extra,
    }
    if max_steps is not None:
        recipe["max_steps"] = max_steps
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trainctl_cmd(*args: str, storage: Path) -> list[str]:
    return [
        "timeout",
        "-s",
        "KILL",
        str(int(RUN_TIMEOUT_S)),
        sys.executable,
        "-m",
        "trainctl.cli.main",
        *args,
        "--storage",
        str(storage),
    ]


def inject(scenario: str, node: list[int], worker: int | None) -> float | None:
    """The fault, the same way for every contender; returns when it was done (None: the worker
    was not found). The benchmark stamps the time itself, right before the signal."""
    if scenario == "worker_crash":
        if worker is None:
            return None
        killed = time.time()
        os.kill(worker, signal.SIGKILL)
        return killed
    killed = time.time()
    proctree.signal_all(node, signal.SIGSTOP if scenario == "node_freeze" else signal.SIGKILL)
    return killed


def tagged_node(job: str, node: str) -> list[int]:
    on_node = set(proctree.tagged("TRAINCTL_NODE", node))
    return [pid for pid in proctree.tagged("TRAINCTL_JOB_ID", job) if pid in on_node]


def trainctl_worker(job: str, node: str) -> int | None:
    from trainctl.launch.zygote import worker_identity

    for pid in tagged_node(job, node):
        identity = worker_identity(pid)
        if identity is not None and identity[1] == 0:
            return pid
    return None


def trainctl_run(work: Path, scenario: str, run: int, reference: str | None) -> dict[str, Any]:
    job = f"tc-{scenario}-{run}"
    log = work / f"{job}.steps"
    spares = 0 if scenario == "worker_crash" else 1
    recipe = trainctl_recipe(work, job, log, spares=spares, max_steps=MAX_STEPS)
    storage = work / "store"
    proc = subprocess.Popen(
        trainctl_cmd("launch", str(recipe), "--job-id", job, "--json", storage=storage),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    result: dict[str, Any] = {"ok": False, "latency_s": None, "exit": None}
    try:
        if not wait_for_step(log, FAULT_STEP, 120):
            result["exit"] = "never reached the fault step"
            return result
        killed = inject(scenario, tagged_node(job, "node-1"), trainctl_worker(job, "node-1"))
        if killed is None:
            result["exit"] = "no worker found"
            return result
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        fingerprint = None
        with contextlib.suppress(ValueError):
            fingerprint = json.loads(out).get("fingerprint")
        result["latency_s"] = first_step_after(log, killed)
        result["exit"] = proc.returncode
        result["ok"] = proc.returncode == 0 and result["latency_s"] is not None
        if reference is not None:
            result["ok"] = result["ok"] and fingerprint == reference
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
        proctree.signal_all(proctree.tagged("TRAINCTL_JOB_ID", job), signal.SIGKILL)


def trainctl_reference(work: Path, job: str = "reference", steps: int = MAX_STEPS) -> str:
    """The uninterrupted run's fingerprint (the correctness oracle for every trainctl run);
    its step log is ``<job>.steps``."""
    log = work / f"{job}.steps"
    recipe = trainctl_recipe(work, job, log, spares=0, max_steps=steps)
    proc = subprocess.run(
        trainctl_cmd("launch", str(recipe), "--job-id", job, "--json", storage=work / "store"),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{proc.stderr[-3000:]}")
    return str(json.loads(proc.stdout)["fingerprint"])


# -- plain torchrun ---------------------------------------------------------------------------
def torchrun_agent(
    work: Path,
    run: str,
    node: str,
    port: int,
    log: Path,
    *,
    tuned: bool,
    elastic: bool,
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """One plain torchrun agent (`prefix`: a command it runs under, e.g. another user)."""
    env = {
        **os.environ,
        "BENCH_RUN": run,
        "BENCH_NODE": node,
        "TRAINCTL_JOB_ID": run,
        "TRAINCTL_CONFIG": json.dumps(CONFIG),
        "TRAINCTL_CHECKPOINT": json.dumps(CHECKPOINT),
        "TRAINCTL_CHECKPOINT_ROOT": str(work / "ckpt" / run),
        "TRAINCTL_STEP_LOG": str(log),
        "TRAINCTL_MAX_STEPS": str(MAX_STEPS if not run.startswith("good") else 10**9),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # As trainctl's own workers run: each agent's rendezvous store connection is its own.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    env.pop("TRAINCTL_AGENT_SOCKET", None)
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={'1:2' if elastic else '2'}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={run}",
        "--max-restarts=100" if run.startswith("good") else "--max-restarts=3",
        "--monitor-interval=0.1",
    ]
    if tuned:
        argv.append(f"--rdzv-conf={TUNED_RDZV}")
    argv.append(str(SCRIPT))
    out = open(work / f"{run}-{node}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def node_pids(run: str, node: str) -> list[int]:
    on_node = set(proctree.tagged("BENCH_NODE", node))
    return [pid for pid in proctree.tagged("BENCH_RUN", run) if pid in on_node]


def worker_of(run: str, node: str) -> int | None:
    for pid in node_pids(run, node):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if any(e.startswith(b"LOCAL_RANK=") for e in env) and b"distributed.run" not in cmdline:
                return pid
    return None


def torchrun_run(work: Path, scenario: str, tuned: bool, run: int) -> dict[str, Any]:
    name = f"tr-{scenario}-{'tuned' if tuned else 'default'}-{run}"
    log = work / f"{name}.steps"
    port = free_port()
    elastic = scenario != "worker_crash"
    agents = [torchrun_agent(work, name, "a", port, log, tuned=tuned, elastic=elastic)]
    time.sleep(1.0)  # node a hosts the rendezvous store
    agents.append(torchrun_agent(work, name, "b", port, log, tuned=tuned, elastic=elastic))
    result: dict[str, Any] = {"ok": False, "latency_s": None, "exit": None}
    try:
        if not wait_for_step(log, FAULT_STEP, 120):
            result["exit"] = "never reached the fault step"
            return result
        killed = inject(scenario, node_pids(name, "b"), worker_of(name, "b"))
        if killed is None:
            result["exit"] = "no worker found"
            return result
        survivors = agents if scenario == "worker_crash" else agents[:1]
        # A frozen peer is never noticed by torchrun itself (its sockets stay open): give it a
        # minute, not the full run timeout.
        deadline = time.monotonic() + (60.0 if scenario == "node_freeze" else RUN_TIMEOUT_S)
        while time.monotonic() < deadline and any(a.poll() is None for a in survivors):
            time.sleep(0.1)
        codes = [a.poll() for a in survivors]
        reached = max((s for _, _, s in read_steps(log)), default=0)
        result["latency_s"] = first_step_after(log, killed)
        result["exit"] = codes
        result["ok"] = all(c == 0 for c in codes) and reached >= MAX_STEPS
        return result
    finally:
        proctree.signal_all(proctree.tagged("BENCH_RUN", name), signal.SIGKILL)
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.wait(timeout=5)


# -- goodput ----------------------------------------------------------------------------------
def step_median(log: Path) -> float:
    """The median time between consecutive steps of one process in a step log."""
    rows = sorted(read_steps(log))
    deltas = [
        t1 - t0
        for (t0, pid0, step0), (t1, pid1, step1) in itertools.pairwise(rows)
        if pid1 == pid0 and step1 == step0 + 1
    ]
    return statistics.median(deltas)


def goodput_figure(log: Path, started: float, ended: float, reference_s: float) -> dict[str, Any]:
    """Goodput = steps reached × the *uninterrupted* run's median step (`reference_s`, the same
    for every contender) / wall time, and where the rest of the wall time went (from the step
    log alone).

    wall = startup (launch → first step) + consecutive step intervals + restart gaps + tail;
    `step_excess_s` is what consecutive intervals took beyond the median step (checkpoint
    stalls, noise, CPU taken by anything else), `replayed_steps` the work redone after restores.
    """
    rows = sorted(r for r in read_steps(log) if started <= r[0] <= ended)
    if len(rows) < 3:
        return {"goodput": 0.0, "steps": 0, "median_step_s": None, "wall_s": ended - started}
    deltas: list[float] = []
    gaps: list[float] = []
    replayed = 0
    for (t0, pid0, step0), (t1, pid1, step1) in itertools.pairwise(rows):
        if pid1 == pid0 and step1 == step0 + 1:
            deltas.append(t1 - t0)
        else:
            gaps.append(t1 - t0)
            replayed += max(0, step0 - step1 + 1)
    median = statistics.median(deltas)
    steps = max(step for _, _, step in rows)
    wall = ended - started
    return {
        "goodput": steps * reference_s / wall,
        "steps": steps,
        "reference_step_s": reference_s,
        "median_step_s": median,
        "mean_step_s": statistics.fmean(deltas),
        "wall_s": wall,
        "startup_s": rows[0][0] - started,
        "step_excess_s": sum(deltas) - len(deltas) * median,
        "restart_gaps_s": [round(g, 3) for g in gaps],
        "replayed_steps": replayed,
        "tail_s": ended - rows[-1][0],
    }


def trainctl_goodput(
    work: Path, minutes: float, every_s: float, reference_s: float
) -> dict[str, Any]:
    job = "tc-goodput"
    log = work / f"{job}.steps"
    recipe = trainctl_recipe(
        work,
        job,
        log,
        spares=1,
        max_steps=None,
        recovery={"exclude_s": every_s / 2},
        launch={"max_restarts": 1000},
        checkpoint={**CHECKPOINT, **TRAINCTL_CHECKPOINT},
    )
    storage = work / "store"
    started = time.time()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "trainctl.cli.main", "launch", str(recipe)),
            *("--job-id", job, "--storage", str(storage)),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failures = 0
    try:
        end = started + minutes * 60
        next_failure = started + every_s
        while time.time() < end:
            time.sleep(0.2)
            # Every failure well inside the window: its recovery is measured too.
            if time.time() >= next_failure and next_failure <= end - every_s / 4:
                state = JobStore(str(storage)).read_state(job).to_json()
                victim = state["attempts"][-1]["nodes"][-1]
                on_node = set(proctree.tagged("TRAINCTL_NODE", victim))
                proctree.signal_all(
                    [p for p in proctree.tagged("TRAINCTL_JOB_ID", job) if p in on_node],
                    signal.SIGKILL,
                )
                failures += 1
                next_failure += every_s
        ended = time.time()
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        proctree.signal_all(proctree.tagged("TRAINCTL_JOB_ID", job), signal.SIGKILL)
    return {**goodput_figure(log, started, ended, reference_s), "failures": failures}


def torchrun_goodput(
    work: Path, minutes: float, every_s: float, reference_s: float
) -> dict[str, Any]:
    name = "good-torchrun"
    log = work / f"{name}.steps"
    port = free_port()
    started = time.time()
    a = torchrun_agent(work, name, "a", port, log, tuned=True, elastic=True)
    time.sleep(1.0)
    b = torchrun_agent(work, name, "b", port, log, tuned=True, elastic=True)
    failures = 0
    try:
        end = started + minutes * 60
        next_failure = started + every_s
        while time.time() < end:
            time.sleep(0.2)
            # Every failure well inside the window: its recovery is measured too.
            if time.time() >= next_failure and next_failure <= end - every_s / 4:
                proctree.signal_all(node_pids(name, "b"), signal.SIGKILL)
                b.wait()
                failures += 1
                # a replacement node joins at once (as a scheduler would provide)
                b = torchrun_agent(work, name, "b", port, log, tuned=True, elastic=True)
                next_failure += every_s
        ended = time.time()
    finally:
        proctree.signal_all(proctree.tagged("BENCH_RUN", name), signal.SIGKILL)
        for agent in (a, b):
            with contextlib.suppress(Exception):
                agent.wait(timeout=5)
    return {**goodput_figure(log, started, ended, reference_s), "failures": failures}


# -- report -----------------------------------------------------------------------------------
def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [r["latency_s"] for r in results if r["ok"] and r["latency_s"] is not None]
    return {
        "runs": len(results),
        "succeeded": sum(1 for r in results if r["ok"]),
        "success_rate": sum(1 for r in results if r["ok"]) / len(results) if results else 0.0,
        "median_s": statistics.median(latencies) if latencies else None,
        "min_s": min(latencies) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "exits": [r["exit"] for r in results if not r["ok"]],
    }


def repeat(count: int, label: str, one: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    results = []
    for i in range(count):
        result = one(i)
        results.append(result)
        lat = result["latency_s"]
        print(
            f"  {label} run {i + 1}/{count}: {'ok' if result['ok'] else 'FAILED'}"
            + (f", kill -> first step {lat:.2f} s" if lat is not None else ""),
            file=sys.stderr,
            flush=True,
        )
    return summarise(results)


def fmt(value: float | None, unit: str = " s") -> str:
    return "—" if value is None else f"{value:.2f}{unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="trainctl runs per failure kind")
    parser.add_argument("--peer-runs", type=int, default=5, help="torchrun runs per variant")
    parser.add_argument("--goodput-minutes", type=float, default=10.0)
    parser.add_argument("--failure-every", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--checkpoint-interval", type=int, default=10, help="steps between checkpoints"
    )
    parser.add_argument(
        "--goodput-only", action="store_true", help="skip the latency runs (figures: goodput)"
    )
    parser.add_argument(
        "--trainctl-goodput-only",
        action="store_true",
        help="goodput: skip plain torchrun (for breaking down trainctl's own losses)",
    )
    parser.add_argument(
        "--work", type=Path, help="keep stores and logs here (default: a deleted temp dir)"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="trainctl's goodput run: also checkpoint into host memory every step "
        "(checkpoint.memory; the reference runs stay without it, so its cost counts; the "
        "simulated nodes share this host's tmpfs, so the tier survives a node kill here)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    CHECKPOINT["interval_steps"] = args.checkpoint_interval
    if args.memory:
        TRAINCTL_CHECKPOINT["memory"] = {"enabled": True}

    figures: dict[str, Any] = {"targets": TARGETS, "settings": vars(args)}
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trainctl-rec-")))
        else:
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        (work / "store").mkdir(exist_ok=True)
        print("reference run (uninterrupted)...", file=sys.stderr, flush=True)
        reference = trainctl_reference(work)
        latency: dict[str, dict[str, Any]] = {}
        for scenario in () if args.goodput_only else SCENARIOS:
            print(f"{scenario}:", file=sys.stderr, flush=True)
            latency[scenario] = {
                "trainctl": repeat(
                    args.runs, "trainctl", lambda i, s=scenario: trainctl_run(work, s, i, reference)
                ),
                "torchrun_tuned": repeat(
                    args.peer_runs,
                    "torchrun tuned",
                    lambda i, s=scenario: torchrun_run(work, s, True, i),
                ),
                "torchrun_default": repeat(
                    args.peer_runs,
                    "torchrun default",
                    lambda i, s=scenario: torchrun_run(work, s, False, i),
                ),
            }
        figures["latency"] = latency
        goodput: dict[str, Any] = {}
        if args.goodput_minutes > 0:
            print(f"goodput, {args.goodput_minutes:g} min each:", file=sys.stderr, flush=True)
            # The steady step of an uninterrupted run long enough to be past its warm-up (a
            # 40-step run's median is ~35% slower than the steady state on this machine).
            trainctl_reference(work, "reference-steady", GOODPUT_REFERENCE_STEPS)
            reference_s = step_median(work / "reference-steady.steps")
            goodput["trainctl"] = trainctl_goodput(
                work, args.goodput_minutes, args.failure_every, reference_s
            )
            if not args.trainctl_goodput_only:
                goodput["torchrun_tuned"] = torchrun_goodput(
                    work, args.goodput_minutes, args.failure_every, reference_s
                )
        figures["goodput"] = goodput

    tc = latency
    met: dict[str, bool] = {}
    for scenario in tc:
        median = tc[scenario]["trainctl"]["median_s"]
        met[f"{scenario}_s"] = median is not None and median <= TARGETS[f"{scenario}_s"]
        met[f"{scenario}_success"] = tc[scenario]["trainctl"]["success_rate"] >= 1.0
    if goodput:
        met["goodput"] = goodput["trainctl"]["goodput"] >= TARGETS["goodput"]
    figures["met"] = met
    figures["targets_met"] = all(met.values())

    if args.json:
        print(json.dumps(figures, indent=2, default=str))
        return 0
    print(f"{'failure':<14}{'contender':<20}{'success':>10}{'median kill->step':>20}{'target':>10}")
    for scenario in tc:
        target = TARGETS[f"{scenario}_s"]
        for contender, row in tc[scenario].items():
            rate = f"{row['succeeded']}/{row['runs']}"
            print(
                f"{scenario:<14}{contender:<20}{rate:>10}{fmt(row['median_s']):>20}"
                + (f"{'≤ ' + str(target) + ' s':>10}" if contender == "trainctl" else "")
            )
    if goodput:
        print()
        print(f"{'goodput':<34}{'goodput':>10}{'steps':>8}{'failures':>10}{'target':>10}")
        for contender, row in goodput.items():
            target = f"{'≥ 95%':>10}" if contender == "trainctl" else ""
            share = f"{row['goodput'] * 100:>9.1f}%"
            print(f"{contender:<34}{share}{row['steps']:>8}{row['failures']:>10}{target}")
            if row["median_step_s"] is not None:
                print(
                    f"  wall {row['wall_s']:.1f} s: startup {row['startup_s']:.1f} s, step "
                    f"median {row['median_step_s'] * 1e3:.1f} ms (mean "
                    f"{row['mean_step_s'] * 1e3:.1f} ms, excess {row['step_excess_s']:.1f} s), "
                    f"restart gaps {sum(row['restart_gaps_s']):.1f} s, "
                    f"{row['replayed_steps']} steps replayed"
                )
    missed = ", ".join(k for k, v in met.items() if not v) or "none missed"
    print(f"\ntargets met: {figures['targets_met']} ({missed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
