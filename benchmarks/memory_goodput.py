"""Goodput with the memory checkpoint tier on and off, a failure every 2 minutes (issue 17).

One invocation, benchmarks/recovery.py's workload (recipes/tiny_gpt.py, small config, compute
steps, 2 simulated nodes of one worker), durable checkpoints every 10 steps to local disk in
both modes; "on" adds ``checkpoint.memory {enabled: true, interval_steps: 1}``:

1. **References**: uninterrupted runs (`--reference-steps` each, no failure) without the tier
   and, when mode "on" runs, with it (the same config as "on"); their median steps are the
   yardsticks.
2. **Goodput** per mode over `--minutes` with a failure every `--failure-every` seconds:
   goodput = steps reached x a reference's median step / wall (issue 17's definition, as
   benchmarks/recovery.py computes it), with the wall split into startup, step excess (the
   per-step cost of checkpointing shows here), restart gaps and replayed steps. Two readings:
   against the tier-off reference (``goodput``: failures and the tier's per-step cost both
   count) and against the same mode's own uninterrupted reference (``goodput_failures_only``:
   what failures cost a job running that config; "normalised by the uninterrupted run's step
   time", as the issue words it). Each reading twice: by the reference's median step (as
   before) and by its pace, its wall time per step (``goodput_pace_*``): the median leaves out
   the reference's own durable-checkpoint stalls and noise (its mean step is ~1.1x its median
   here), so by the median even an uninterrupted run scores ~90%; by its pace it scores 100%.
   A third yardstick needs no separate run: the run's own **steady pace**, its mean step away
   from failures (``goodput_steady_pace``, `steady_pace`). A reference run is ~45 s on a shared
   host whose load moves by 5-20% between minutes; the steady pace is measured on the same
   host at the same time, so what it leaves as loss is what failures cost: startup, restart
   gaps, replayed steps and slow steps after a restart. `targets_met` says which readings reach
   98% with the tier on.
3. **Per failure**: kill -> first step completed by a worker started after the kill, steps
   replayed (completed before the kill and computed again), and the step restored from
   (state.json): medians per mode. With the tier on, a restore from memory lands on the last
   step whose memory save committed; from durable storage on a multiple of 10.

Failures (`--failure`): ``worker`` (SIGKILL of node-1's worker; the node survives, so its
memory tier does) or ``node`` (SIGKILL of every process of a node, one spare node joins; the
local scheduler removes the lost node's tmpfs directory, so its shards come from the replica a
peer's holder kept).

The memory tier's save is a copy into the rank's tmpfs slot and its record, before the step's
progress is reported (recipes/_trainer.py): a worker killed after reporting step N restores
step N, so "replayed" is 0 unless a kill lands between two ranks' saves of one step.

    python benchmarks/memory_goodput.py [--minutes 10] [--failure-every 120]
                                        [--failure worker|node] [--modes on off] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recovery

from trainctl.launch import proctree
from trainctl.store import JobStore

DURABLE_EVERY = 10
REFERENCE_STEPS = 1000
TARGET_GOODPUT = 0.98
SETTLE_STEPS = 200
"""Steps after a (re)start left out of `steady_pace`."""


def checkpoint_section(memory: bool, replicas: int = 1) -> dict[str, Any]:
    """The recipe's ``checkpoint:`` section for a mode (memory stated either way, so a change
    of the default does not change what "off" measures)."""
    return {
        "interval_steps": DURABLE_EVERY,
        "keep_last": 2,
        "memory": {"enabled": memory, "interval_steps": 1, "replicas": replicas},
    }


def replayed_after(rows: list[tuple[float, int, int]], killed: float) -> int | None:
    """Steps completed before the kill and completed again after it (None: no step after)."""
    before = [step for t, _, step in rows if t <= killed]
    after = [step for t, _, step in rows if t > killed]
    if not after:
        return None
    high_water = max(before, default=0)
    return max(0, high_water - (min(after) - 1))


def inject(failure: str, job: str, storage: Path) -> float | None:
    """SIGKILL node-1's worker, or every process of the newest attempt's last node; returns
    when (None: no worker found)."""
    state = JobStore(str(storage)).read_state(job).to_json()
    victim = state["attempts"][-1]["nodes"][-1]
    if failure == "worker":
        worker = recovery.trainctl_worker(job, victim)
        if worker is None:
            return None
        killed = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        return killed
    pids = recovery.tagged_node(job, victim)
    killed = time.time()
    proctree.signal_all(pids, signal.SIGKILL)
    return killed


def restored_steps(storage: Path, job: str) -> list[int | None]:
    state = JobStore(str(storage)).read_state(job).to_json()
    return [attempt.get("restored_step") for attempt in state["attempts"][1:]]


def step_pace(log: Path) -> float:
    """An uninterrupted run's wall time per step: the mean of its consecutive step intervals
    (its durable checkpoints' stalls and the host's noise included, as they are in the runs
    with failures). Against this yardstick the uninterrupted run itself scores 100%; against
    its median step (`recovery.step_median`) it scores median/mean, ~90% here."""
    rows = sorted(recovery.read_steps(log))
    deltas = [
        t1 - t0
        for (t0, pid0, step0), (t1, pid1, step1) in itertools.pairwise(rows)
        if pid1 == pid0 and step1 == step0 + 1
    ]
    return statistics.fmean(deltas)


def steady_pace(log: Path, started: float, ended: float, settle: int = SETTLE_STEPS) -> float:
    """The run's own wall time per step away from failures: the mean step interval of each
    worker's stretch of steps after its first `settle` (a restart's slow first steps are left
    out of the yardstick, so they count as loss). Measured in the same run, on the same host at
    the same time, it does not move with the host's load as a separate reference run does."""
    rows = sorted(r for r in recovery.read_steps(log) if started <= r[0] <= ended)
    deltas: list[float] = []
    run = 0
    for (t0, pid0, step0), (t1, pid1, step1) in itertools.pairwise(rows):
        if pid1 == pid0 and step1 == step0 + 1:
            run += 1
            if run > settle:
                deltas.append(t1 - t0)
        else:
            run = 0
    return statistics.fmean(deltas)


def pace_halves(log: Path) -> tuple[float, float]:
    """An uninterrupted run's wall time per step in the first and the second half of its
    steps: whether a job slows as it ages, apart from its failures."""
    rows = sorted(recovery.read_steps(log))
    middle = len(rows) // 2

    def pace(half: list[tuple[float, int, int]]) -> float:
        return (half[-1][0] - half[0][0]) / (half[-1][2] - half[0][2])

    return pace(rows[: middle + 1]), pace(rows[middle:])


@contextlib.contextmanager
def launched(recipe: Path, job: str, storage: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`trainctl launch` of `recipe` until the block ends, then SIGINT and whatever of the
    job is left SIGKILLed."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "trainctl.cli.main", "launch", str(recipe)),
            *("--job-id", job, "--storage", str(storage)),
        ],
        cwd=recovery.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        proctree.signal_all(proctree.tagged("TRAINCTL_JOB_ID", job), signal.SIGKILL)


def reference_step(
    work: Path, memory: bool, steps: int, replicas: int = 1, minutes: float | None = None
) -> tuple[float, float, tuple[float, float]]:
    """The median step, the pace (`step_pace`) and the pace by halves (`pace_halves`) of an
    uninterrupted run of the mode's config: `steps` steps, or `minutes` of wall time (as long
    as the runs with failures, so a job's age and the host's minutes weigh on both alike)."""
    job = f"reference-tier-{'on' if memory else 'off'}"
    log = work / f"{job}.steps"
    section = checkpoint_section(memory, replicas)
    if minutes is None:
        recovery.CHECKPOINT.clear()
        recovery.CHECKPOINT.update(section)
        recovery.trainctl_reference(work, job, steps)
    else:
        recipe = recovery.trainctl_recipe(
            work, job, log, spares=0, max_steps=None, checkpoint=section
        )
        with launched(recipe, job, work / "store") as proc:
            deadline = time.time() + minutes * 60
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
            if proc.returncode is not None:
                raise SystemExit(f"the reference run ended early (exit {proc.returncode})")
            attempts = len(JobStore(str(work / "store")).read_state(job).attempts)
            if attempts != 1:
                raise SystemExit(f"the reference run restarted ({attempts} attempts)")
    return recovery.step_median(log), step_pace(log), pace_halves(log)


def readings(
    row: dict[str, Any], own: tuple[float, float], off: tuple[float, float]
) -> dict[str, Any]:
    """`row`'s goodput against each yardstick: the mode's own uninterrupted run (failures
    only) and the tier-off one (failures and the tier's per-step cost), each by its median
    step (`goodput`, as before) and by its pace (`step_pace`)."""
    wall = row["wall_s"]

    def share(step_s: float) -> float:
        return row["steps"] * step_s / wall if wall > 0 else 0.0

    return {
        **row,
        "own_reference_step_s": own[0],
        "goodput_failures_only": share(own[0]),
        "own_reference_pace_s": own[1],
        "reference_pace_s": off[1],
        "goodput_pace_failures_only": share(own[1]),
        "goodput_pace_failures_and_step_cost": share(off[1]),
    }


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """Which reading of the tier-on goodput reaches the target (none without an "on" run)."""
    row = results.get("on")
    if row is None:
        return {}
    return {
        key: row[key] >= TARGET_GOODPUT
        for key in (
            "goodput_steady_pace",
            "goodput_pace_failures_only",
            "goodput_pace_failures_and_step_cost",
            "goodput_failures_only",
            "goodput",
        )
    }


def goodput_run(
    work: Path,
    memory: bool,
    minutes: float,
    every_s: float,
    failure: str,
    reference_s: float,
    replicas: int = 1,
) -> dict[str, Any]:
    job = f"mem-goodput-{'on' if memory else 'off'}"
    log = work / f"{job}.steps"
    recipe = recovery.trainctl_recipe(
        work,
        job,
        log,
        spares=1 if failure == "node" else 0,
        max_steps=None,
        # Failures are injected on purpose: a worker killed twice on one node must not get
        # the node blamed and excluded (a real fleet would), or the job ends at 1 node.
        recovery={
            "exclude_s": every_s / 2,
            "repeat_offender_crashes": 1000,
            "restarts_per_cause": {"worker_crash": 1000, "node_fault": 1000},
        },
        launch={"max_restarts": 1000},
        checkpoint=checkpoint_section(memory, replicas),
    )
    storage = work / "store"
    started = time.time()
    kills: list[float] = []
    with launched(recipe, job, storage):
        end = started + minutes * 60
        next_failure = started + every_s
        while time.time() < end:
            time.sleep(0.2)
            # Every failure well inside the window: its recovery is measured too.
            if time.time() >= next_failure and next_failure <= end - every_s / 4:
                killed = inject(failure, job, storage)
                if killed is not None:
                    kills.append(killed)
                next_failure += every_s
        ended = time.time()
        restored = restored_steps(storage, job)
    rows = recovery.read_steps(log)
    per_failure = [
        {
            "kill_to_first_step_s": recovery.first_step_after(log, killed),
            "replayed_steps": replayed_after(rows, killed),
            "step_at_kill": max((s for t, _, s in rows if t <= killed), default=0),
        }
        for killed in kills
    ]
    for row, step in zip(per_failure, restored, strict=False):
        row["restored_step"] = step
    latencies = [r["kill_to_first_step_s"] for r in per_failure if r["kill_to_first_step_s"]]
    replayed = [r["replayed_steps"] for r in per_failure if r["replayed_steps"] is not None]
    figure = recovery.goodput_figure(log, started, ended, reference_s)
    steady = steady_pace(log, started, ended) if figure.get("steps") else None
    return {
        "memory": memory,
        **figure,
        "steady_pace_s": steady,
        "goodput_steady_pace": figure["steps"] * steady / figure["wall_s"] if steady else 0.0,
        "failures": len(kills),
        "per_failure": per_failure,
        "median_kill_to_first_step_s": statistics.median(latencies) if latencies else None,
        "median_replayed_steps": statistics.median(replayed) if replayed else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="per mode")
    parser.add_argument("--failure-every", type=float, default=120.0, help="seconds")
    parser.add_argument("--failure", choices=("worker", "node"), default="worker")
    parser.add_argument("--modes", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument(
        "--reference-minutes",
        type=float,
        help="run each reference this long instead of --reference-steps (e.g. as long as "
        "--minutes, so a job's age weighs on the reference as on the run)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="checkpoint.memory.replicas with the tier on"
    )
    parser.add_argument("--work", type=Path, help="keep stores and step logs here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trainctl-mg-")))
        else:
            work = args.work.resolve()
            work.mkdir(parents=True, exist_ok=True)
        (work / "store").mkdir(exist_ok=True)
        own: dict[str, tuple[float, float]] = {}
        length = (
            f"{args.reference_steps} steps"
            if args.reference_minutes is None
            else f"{args.reference_minutes:g} min"
        )
        for mode in ("off", *(m for m in args.modes if m == "on")):
            print(f"reference, tier {mode}: {length} uninterrupted ...", file=sys.stderr)
            median, pace, halves = reference_step(
                work, mode == "on", args.reference_steps, args.replicas, args.reference_minutes
            )
            own[mode] = (median, pace)
            results[f"reference_tier_{mode}_pace_halves_s"] = halves
        reference_s = own["off"][0]
        results["reference_step_s"] = reference_s
        results["reference_pace_s"] = own["off"][1]
        results["reference_tier_on_step_s"] = own["on"][0] if "on" in own else None
        results["reference_tier_on_pace_s"] = own["on"][1] if "on" in own else None
        for mode in args.modes:
            print(f"goodput, memory tier {mode}, {args.minutes:g} min ...", file=sys.stderr)
            row = goodput_run(
                work,
                mode == "on",
                args.minutes,
                args.failure_every,
                args.failure,
                reference_s,
                args.replicas,
            )
            results[mode] = readings(row, own[mode], own["off"]) if "wall_s" in row else row
        results["targets_met"] = targets(results)
    _print(results, args.modes, args.failure)
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _print(results: dict[str, Any], modes: list[str], failure: str) -> None:
    err = sys.stderr
    print(
        f"\nuninterrupted median step: tier off {_ms(results['reference_step_s'])}, "
        f"tier on {_ms(results.get('reference_tier_on_step_s'))}; pace (wall per step): "
        f"tier off {_ms(results.get('reference_pace_s'))}, "
        f"tier on {_ms(results.get('reference_tier_on_pace_s'))}",
        file=err,
    )
    for mode in ("off", "on"):
        halves = results.get(f"reference_tier_{mode}_pace_halves_s")
        if halves:
            print(
                f"  tier {mode} reference's pace, first half {_ms(halves[0])}, "
                f"second half {_ms(halves[1])}",
                file=err,
            )
    print(f"failure: {failure} SIGKILL; goodput target >= {TARGET_GOODPUT:.0%}", file=err)
    for mode in modes:
        row = results[mode]
        print(
            f"  tier {mode:3}  goodput {row['goodput'] * 100:5.1f}% vs the tier-off reference "
            f"(failures + per-step cost), "
            f"{row.get('goodput_failures_only', 0.0) * 100:5.1f}% vs its own uninterrupted "
            f"reference (failures only); target {TARGET_GOODPUT:.0%}",
            file=err,
        )
        if row.get("steady_pace_s"):
            print(
                f"      by the run's own steady pace ({_ms(row['steady_pace_s'])} a step away "
                f"from failures, same host, same time): {row['goodput_steady_pace'] * 100:5.1f}%",
                file=err,
            )
        if "goodput_pace_failures_only" in row:
            print(
                f"      by the references' pace: "
                f"{row['goodput_pace_failures_and_step_cost'] * 100:5.1f}% vs tier off, "
                f"{row['goodput_pace_failures_only'] * 100:5.1f}% vs its own "
                f"(mean step here {_ms(row.get('mean_step_s'))})",
                file=err,
            )
        print(
            f"      steps {row['steps']}  median step {_ms(row.get('median_step_s'))}  "
            f"failures {row['failures']}",
            file=err,
        )
        if row.get("median_step_s") is not None:
            print(
                f"      wall {row['wall_s']:.1f} s: startup {row['startup_s']:.1f} s, step excess "
                f"{row['step_excess_s']:.1f} s, restart gaps {sum(row['restart_gaps_s']):.1f} s, "
                f"{row['replayed_steps']} steps replayed",
                file=err,
            )
        for one in row["per_failure"]:
            latency = one["kill_to_first_step_s"]
            print(
                f"      kill at step {one['step_at_kill']}: restored {one.get('restored_step')}, "
                f"replayed {one['replayed_steps']}, kill -> first step "
                f"{'-' if latency is None else f'{latency:.2f} s'}",
                file=err,
            )
        latency = row["median_kill_to_first_step_s"]
        print(
            f"      median kill -> first step {'-' if latency is None else f'{latency:.2f} s'}, "
            f"median replayed {row['median_replayed_steps']}",
            file=err,
        )
    for reading, met in results.get("targets_met", {}).items():
        print(
            f"  tier on, {reading} >= {TARGET_GOODPUT:.0%}: {'met' if met else 'NOT met'}", file=err
        )


if __name__ == "__main__":
    sys.exit(main())
