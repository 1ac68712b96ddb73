"""Scale: the real controller with 128 to 4,096 simulated node agents (`trainctl.sim`).

For each N: the controller (`python -m trainctl.sim.job`: `run_job`, the same code `trainctl
launch` runs) with N simulated agents (8 workers each, a step a second, heartbeats at the
default 0.25 s) multiplexed in a few processes; a steady window; one node killed; the
controller then stopped with SIGTERM once the relaunched attempt runs. Measured:

- failure -> decision: the node's connection reset (fault log) -> the policy's decision
  (`attempt_ended.decided_at`); target < 100 ms at 1,024;
- planning a relaunch: decision -> `recovery` event (exclusion, selection, plan) and
  decision -> the next attempt started (plan written, state saved); target < 1 s;
- controller CPU for heartbeats: its process CPU time (/proc/PID/stat) over a fixed wall
  window while every node runs, as % of one core; target < 10% at 1,024;
- controller memory: peak RSS (VmHWM);
- store writes: event files written per event (O(1): one small file each); the job record's
  files (state.json and its pieces) rewritten during the steady window (progress: O(1),
  no node shard); and per event kind, through the real journal at each N and at 128 for
  comparison (`scale_writes`: files and bytes for a node lost, an exclusion, an attempt's
  end and a progress interval must be flat across N; an attempt's start is O(N) by nature);
- `trainctl status` / `events` / `report` on the resulting store; target < 1 s for status.

``--events 100000`` adds a job with that many events (written by the real `JobStore`) and
times `events` and `report` on it (target < 5 s). ``--rendezvous`` measures the c10d
rendezvous key pattern on a TCPStore hosted as the controller hosts it (`rdzv_bench`).

    python benchmarks/scale.py [--nodes 128 512 1024] [--events 100000] [--rendezvous]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import scale_writes  # noqa: E402
from benchmarks.scale_store import events_bench, rdzv_bench  # noqa: E402

STEP_S = 1.0
STEADY_S = 10.0
KILL_STEP = 18
TICKS = os.sysconf("SC_CLK_TCK")
RAW = ("-f", "raw", "--nonblocking", "-o")
PROFILE: list[Path] = []
"""Where to write a py-spy profile of the controller's steady window (``--profile DIR``)."""
PROFILE_RATE: list[int] = [50]
"""py-spy's samples a second (``--profile-rate``; the controller is mostly idle, so a busy
share of 10% gets about 5 samples a second at 50)."""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def events_of(job_dir: Path) -> list[dict[str, Any]]:
    found = [read_json(p) for p in (job_dir / "events").glob("*.json")]
    return sorted((e for e in found if e), key=lambda e: e["time"])


def wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def timed_cli(storage: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trainctl.cli.main", *args, "--storage", str(storage)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=300,
    )
    return time.perf_counter() - started


def where_it_stands(job_dir: Path, controller: subprocess.Popen[bytes]) -> str:
    """What the store and the controller show when a size breaks: the job's state and step,
    its attempts, its events by kind, and the controller's CPU so far."""
    state = read_json(job_dir / "state.json") or {}
    kinds: dict[str, int] = {}
    for path in (job_dir / "events").glob("*.json"):
        kind = path.stem.split("-", 3)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    top = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:6])
    alive = controller.poll() is None
    cpu = f"{cpu_s(controller.pid):.0f} s CPU" if alive else f"exited {controller.returncode}"
    attempts = state.get("num_attempts", len(state.get("attempts") or []))
    return (
        f"state {state.get('state')}, step {state.get('step')}, "
        f"{attempts} attempt(s); {sum(kinds.values())} events ({top}); "
        f"controller {cpu}"
    )


def one_size(nodes: int, root: Path, run: int = 0) -> dict[str, Any]:
    tag = f"{nodes}" if not run else f"{nodes}-{run}"  # a store of its own per run
    storage, job = root / f"n{tag}", f"scale-{nodes}"
    fault_log = root / f"faults-{tag}.jsonl"
    # After the steady window: state.json's step (what the window waits for) is written every
    # N/256 s at this size, so the window starts later for a bigger job.
    faults = [{"kind": "kill", "node": "node-7", "step": KILL_STEP + nodes // 128}]
    processes = max(2, nodes // 256)
    command = [sys.executable, "-m", "trainctl.sim.job", "--storage", str(storage)]
    command += ["--job-id", job, "--nodes", str(nodes), "--spares", "2", "--nproc", "8"]
    command += ["--step-s", str(STEP_S), "--max-steps", "100000", "--checkpoint-every", "10"]
    command += ["--processes", str(processes), "--faults", json.dumps(faults)]
    command += ["--fault-log", str(fault_log)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRAINCTL_STORAGE": str(storage)}
    started = time.time()
    controller = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    job_dir = storage / "jobs" / job
    out: dict[str, Any] = {"nodes": nodes, "gpus": nodes * 8, "processes": processes}
    try:
        state = job_dir / "state.json"

        def step_at_least(step: int) -> bool:
            return ((read_json(state) or {}).get("step") or 0) >= step

        wait(lambda: step_at_least(1), 300, f"{nodes} nodes never stepped")
        out["start_s"] = time.time() - started
        wait(lambda: step_at_least(5), 120, "no steady state")
        record_files = [state, *job_dir.glob("node-shards/*.json"), *job_dir.glob("attempts/*")]
        for path in record_files:
            os.utime(path, ns=(0, 0))  # written in the window: mtime no longer 0
        cpu0, wall0 = cpu_s(controller.pid), time.monotonic()
        files0 = {p: p.stat().st_mtime for p in (job_dir / "events").glob("*.json")}
        if PROFILE:
            spy = Path(sys.executable).parent / "py-spy"
            out_file = str(PROFILE[0] / f"controller-{tag}.txt")
            subprocess.run(
                [
                    str(spy),
                    "record",
                    "-p",
                    str(controller.pid),
                    "-d",
                    str(int(STEADY_S)),
                    "-r",
                    str(PROFILE_RATE[0]),
                    *RAW,
                    out_file,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        else:
            time.sleep(STEADY_S)
        cpu1, wall1 = cpu_s(controller.pid), time.monotonic()
        out["heartbeat_cpu_pct"] = 100 * (cpu1 - cpu0) / (wall1 - wall0)
        new = [p for p in (job_dir / "events").glob("*.json") if p not in files0]
        out["steady_events"] = len(new)
        out["event_file_bytes"] = max((p.stat().st_size for p in new), default=0)
        out["state_json_bytes"] = state.stat().st_size
        record_files = [state, *job_dir.glob("node-shards/*.json"), *job_dir.glob("attempts/*")]
        rewritten = [p for p in record_files if p.stat().st_mtime_ns != 0]
        out["steady_record_files"] = len(rewritten)
        out["steady_record_bytes"] = sum(p.stat().st_size for p in rewritten)
        out["plan_json_bytes"] = (job_dir / "attempt-0" / "plan.json").stat().st_size
        window_end = time.time()
        # The simulator creates the log before it writes the line: wait for the line.
        wait(lambda: fault_log.exists() and fault_log.read_text().strip(), 120, "no fault fired")
        killed_at = json.loads(fault_log.read_text().splitlines()[0])["time"]
        out["window_clean"] = killed_at > window_end

        def relaunched() -> bool:
            return any(e["kind"] == "first_step" and e["attempt"] == 1 for e in events_of(job_dir))

        wait(relaunched, 300, "never relaunched")
        events = events_of(job_dir)
        ended = next(e for e in events if e["kind"] == "attempt_ended" and e["attempt"] == 0)
        planned = next(e for e in events if e["kind"] == "recovery")
        next_start = next(e for e in events if e["kind"] == "attempt_started" and e["attempt"] == 1)
        decided = ended["data"]["decided_at"]
        out["decision_ms"] = 1000 * (decided - killed_at)
        out["plan_ms"] = 1000 * (planned["time"] - ended["time"])
        out["relaunch_s"] = next_start["time"] - decided
        out["peak_rss_mb"] = peak_rss_mb(controller.pid)
        controller.send_signal(signal.SIGTERM)
        controller.wait(timeout=300)
    except (TimeoutError, StopIteration) as broke:
        raise TimeoutError(f"{broke}; {where_it_stands(job_dir, controller)}") from None
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
    out["events"] = len(list((job_dir / "events").glob("*.json")))
    out["status_s"] = timed_cli(storage, "status", job)
    out["events_s"] = timed_cli(storage, "events", job)
    out["report_s"] = timed_cli(storage, "report", job)
    return out


TARGETS = {
    "decision_ms": 100.0,
    "plan_ms": 1000.0,
    "heartbeat_cpu_pct": 10.0,
    "status_s": 1.0,
}


def targets_met(row: dict[str, Any]) -> bool:
    return all(row[k] < limit for k, limit in TARGETS.items()) and row.get("writes_flat", True)


def missed(row: dict[str, Any]) -> str:
    """Where a size misses its targets (figure >= target), or an empty string."""
    missed = [f"{k} {row[k]:.3g} >= {t:g}" for k, t in TARGETS.items() if row[k] >= t]
    if not row.get("writes_flat", True):
        missed.append("store writes per event grow with N")
    return ", ".join(missed)


def print_row(row: dict[str, Any]) -> None:
    print(
        f"N={row['nodes']:>5} ({row['gpus']:>6} GPUs, {row['processes']} sim processes): "
        f"start {row['start_s']:.1f} s; failure->decision {row['decision_ms']:.0f} ms "
        f"(target < 100); decision->recovery planned {row['plan_ms']:.0f} ms (target < 1000); "
        f"decision->next attempt started {row['relaunch_s']:.2f} s; "
        f"heartbeat CPU {row['heartbeat_cpu_pct']:.1f}% of a core (target < 10); "
        f"peak RSS {row['peak_rss_mb']:.0f} MB; "
        f"steady-state events {row['steady_events']} in {STEADY_S:g} s "
        f"(largest {row['event_file_bytes']} B); state.json {row['state_json_bytes']} B, "
        f"record files rewritten in the steady window {row['steady_record_files']} "
        f"({row['steady_record_bytes']} B), "
        f"plan.json {row['plan_json_bytes']} B; {row['events']} events: status "
        f"{row['status_s']:.2f} s (target < 1), events {row['events_s']:.2f} s, report "
        f"{row['report_s']:.2f} s; targets_met={targets_met(row)}"
        + (f" (missed: {missed(row)})" if missed(row) else "")
        + ("" if row["window_clean"] else " [the failure fell inside the CPU window]"),
        flush=True,
    )


MEDIANS = ("decision_ms", "plan_ms", "relaunch_s", "heartbeat_cpu_pct", "peak_rss_mb", "status_s")


def print_medians(rows: list[dict[str, Any]]) -> None:
    """Per size run more than once: the median of each figure beside its target."""
    for nodes in sorted({r["nodes"] for r in rows}):
        done = [r for r in rows if r["nodes"] == nodes and "broke" not in r]
        if len(done) < 2:
            continue
        median = {k: statistics.median(r[k] for r in done) for k in MEDIANS}
        figures = ", ".join(f"{k} {median[k]:.3g}" for k in MEDIANS)
        met = all(median[k] < limit for k, limit in TARGETS.items())
        print(f"N={nodes:>5} median of {len(done)}: {figures}; targets_met={met}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, nargs="*", default=[128, 512, 1024])
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--rendezvous", type=int, nargs="*", default=None)
    parser.add_argument("--rdzv-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (medians)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy samples a second")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stores in this folder")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE.append(args.profile)
        PROFILE_RATE[0] = args.profile_rate
    rows: list[dict[str, Any]] = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        scratch: Any = contextlib.nullcontext(tempfile.mkdtemp(prefix="scale-", dir=args.keep))
    else:
        scratch = tempfile.TemporaryDirectory(prefix="trainctl-scale-")
    with scratch as tmp:
        writes = scale_writes.run(sorted({128, *args.nodes}), Path(tmp) / "writes")
        scale_writes.print_writes(writes)
        flat = all(writes["flat"].values())
        for run, nodes in ((r, n) for r in range(args.repeats) for n in args.nodes):
            try:
                row = one_size(nodes, Path(tmp), run)
            except (TimeoutError, StopIteration, OSError) as broke:
                row = {"nodes": nodes, "broke": f"{type(broke).__name__}: {broke}"}
                print(f"N={nodes}: broke: {row['broke']}", flush=True)
            else:
                row["writes_flat"] = flat
                row["writes"] = writes["rows"][nodes]
                row["targets_met"] = targets_met(row)
                print_row(row)
            rows.append(row)
        print_medians(rows)
        extra: dict[str, Any] = {}
        if args.events:
            extra["events"] = events_bench(Path(tmp), args.events)
        if args.rendezvous is not None:
            extra["rendezvous"] = rdzv_bench(args.rendezvous or [128, 512, 1024], args.rdzv_repeats)
    if args.json:
        print(json.dumps({"rows": rows, **extra}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
