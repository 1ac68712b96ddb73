"""The controller's progress bookkeeping fed to the pure detectors (times passed in)."""

from __future__ import annotations

import random

import pytest

from trainctl.health.progress import StragglerPolicy, detect_stragglers, node_step_times
from trainctl.health.verdict import Verdict
from trainctl.protocol import Heartbeat
from trainctl.recovery.monitor import hang_check_interval, straggler_check_interval
from trainctl.recovery.watch import ProgressWatch
from trainctl.spec import HealthSpec

NODES = ("node-0", "node-1")


def beat(step: int, step_time: float | None, busy: float | None = None) -> Heartbeat:
    return Heartbeat(step=step, samples=((step, step_time, busy),))


def started_watch(health: HealthSpec, max_steps: int | None = None) -> ProgressWatch:
    watch = ProgressWatch(health, NODES, world_size=2, max_steps=max_steps)
    watch.node_started("node-0", 0.0)
    watch.node_started("node-1", 1.0)
    return watch


def test_pinned_timeout_between_steps_first_step_allowance_before() -> None:
    watch = started_watch(HealthSpec(hang_timeout_s=3, first_step_allowance_s=100))
    assert watch.check_hang(50.0) is None  # nobody reported: first-step allowance (100 s)
    check = watch.check_hang(102.0)
    assert check is not None and [h.member for h in check.hung] == [0, 1]
    assert "first-step allowance 100 s" in check.timeout.explanation
    watch.record("node-0", {"0": beat(1, None)}, 10.0)
    watch.record("node-1", {"1": beat(1, None)}, 10.0)
    assert watch.check_hang(12.9) is None
    check = watch.check_hang(13.5)
    assert check is not None and {h.member for h in check.hung} == {0, 1}
    assert check.timeout.explanation == "hang timeout 3 s, pinned by the recipe"
    assert watch.node_of(1) == "node-1" and watch.step_of(1) == 1


def test_derived_timeout_uses_step_times_and_finished_ranks_are_not_watched() -> None:
    watch = started_watch(HealthSpec(hang_floor_s=1, hang_k=5), max_steps=3)
    for step in (1, 2):
        watch.record("node-0", {"0": beat(step, 0.5)}, float(step))
        watch.record("node-1", {"1": beat(step, 0.5)}, float(step))
    assert watch.steady_timeout().timeout_s == 2.5
    assert watch.check_hang(4.4) is None
    check = watch.check_hang(4.6)
    assert check is not None and "5 × p99 step time 0.5 s" in check.timeout.explanation
    watch.record("node-0", {"0": beat(3, 0.5)}, 4.6)  # rank 0 finished its last step
    check = watch.check_hang(5.0)
    assert check is not None and [h.member for h in check.hung] == [1]
    watch.node_exited("node-1")
    assert watch.check_hang(100.0) is None


def test_slow_node_by_busy_time_is_degraded_with_numbers() -> None:
    watch = started_watch(HealthSpec(straggler_factor=1.5, straggler_window=6))
    for step in range(1, 9):
        # Wall-clock step times are equal (synchronous), busy times are not.
        watch.record("node-0", {"0": beat(step, 0.3, 0.05)}, float(step))
        watch.record("node-1", {"1": beat(step, 0.3, 0.25)}, float(step))
    assert watch.has_new_samples()
    verdicts = watch.check_stragglers()
    assert not watch.has_new_samples()
    assert verdicts["node-0"].status is Verdict.OK
    slow = verdicts["node-1"]
    assert slow.status is Verdict.DEGRADED and slow.reason.startswith("straggler: median step")
    assert slow.evidence["measure"] == "busy" and slow.evidence["steps"] == [3, 8]
    assert slow.evidence["ratio"] == 5.0 and slow.evidence["window_steps"] == 6


def test_stragglers_need_two_nodes_and_common_steps() -> None:
    watch = started_watch(HealthSpec())
    watch.record("node-0", {"0": beat(1, 0.1)}, 1.0)
    assert watch.check_stragglers() == {}
    watch.record("node-1", {"1": beat(2, 0.1)}, 1.0)  # no step in common yet
    verdicts = watch.check_stragglers()
    assert all(v.status is Verdict.OK for v in verdicts.values())
    assert "not enough data" in verdicts["node-0"].reason


def test_a_rank_saving_a_checkpoint_gets_the_checkpoint_allowance() -> None:
    from trainctl.recovery.watch import ProgressWatch
    from trainctl.spec import HealthSpec

    health = HealthSpec(hang_timeout_s=5.0, checkpoint_allowance_s=20.0)
    watch = ProgressWatch(health, ("node-0",), world_size=2, max_steps=None)
    watch.node_started("node-0", 0.0)
    beat = Heartbeat(step=3, step_time=1.0)
    watch.record("node-0", {"0": beat, "1": beat}, 1.0)
    # rank 1 starts saving step 3 (it may wait for the previous upload)
    watch.record("node-0", {"1": Heartbeat(step=3, saving=True)}, 1.1)
    check = watch.check_hang(7.0)
    assert check is not None and [h.member for h in check.hung] == [0]
    assert "allowance" not in check.timeout.explanation
    watch.record("node-0", {"0": Heartbeat(step=4, step_time=1.0)}, 24.0)
    assert watch.check_hang(24.5) is None  # rank 1: silent 23.5 s of its 5 + 20 s
    check = watch.check_hang(26.5)
    assert check is not None and [h.member for h in check.hung] == [1]
    assert "checkpoint allowance 20 s" in check.timeout.explanation
    watch.record("node-0", {"1": Heartbeat(step=4, step_time=1.0)}, 26.6)
    assert not watch.ranks[1].saving  # the next step ends the save window


@pytest.mark.parametrize(
    ("nodes", "interval_s"),
    [(1, 1.0), (2, 1.0), (128, 1.0), (256, 2.0), (512, 4.0), (1024, 8.0), (4096, 32.0)],
)
def test_straggler_check_interval_grows_with_the_node_count(nodes: int, interval_s: float) -> None:
    assert straggler_check_interval(nodes) == interval_s


@pytest.mark.parametrize(("nodes", "interval_s"), [(1, 0.1), (64, 0.1), (512, 0.5), (1024, 1.0)])
def test_hang_check_interval_grows_with_the_node_count(nodes: int, interval_s: float) -> None:
    assert hang_check_interval(nodes) == interval_s


def reference_verdicts(
    samples: dict[int, dict[int, float]], node_of: dict[int, str], health: HealthSpec
) -> dict[str, object]:
    """The check rebuilt from every rank's samples (what the watch did before it kept
    per-node series incrementally)."""
    common = sorted(set.intersection(*(set(s) for s in samples.values())))
    steps = common[-health.straggler_window :]
    by_rank = {rank: [s[step] for step in steps] for rank, s in samples.items()}
    policy = StragglerPolicy(factor=health.straggler_factor, window=health.straggler_window)
    verdicts = detect_stragglers(node_step_times(by_rank, node_of), policy)
    return {node: (v.status, v.evidence) for node, v in verdicts.items()}


@pytest.mark.parametrize("seed", range(6))
def test_incremental_node_series_match_the_check_rebuilt_from_every_rank(seed: int) -> None:
    rng = random.Random(seed)
    health = HealthSpec(straggler_factor=1.2, straggler_window=rng.choice([5, 8, 20]))
    nodes = tuple(f"node-{i}" for i in range(rng.randint(2, 7)))
    per_node = rng.randint(1, 4)
    node_of = {r: nodes[r // per_node] for r in range(len(nodes) * per_node)}
    watch = ProgressWatch(health, nodes, world_size=len(node_of), max_steps=None)
    slow = rng.choice(nodes)
    samples: dict[int, dict[int, float]] = {rank: {} for rank in node_of}
    lag = {rank: rng.randint(0, 3) for rank in node_of}  # ranks report up to 3 steps behind
    last = rng.randint(health.straggler_window + 4, 5 * health.straggler_window)
    for step in range(1, last + 1):
        for rank, node in node_of.items():
            if step + lag[rank] > last:
                continue
            value = rng.uniform(0.9, 1.1) * (1.6 if node == slow else 1.0)
            samples[rank][step] = value
            batch = {str(rank): beat(step, value)}
            watch.record(node, batch, float(step))
        if step % 3 == 0:
            got = {n: (v.status, v.evidence) for n, v in watch.check_stragglers().items()}
            # The watch keeps the newest 2 x window samples a rank: so does the reference.
            kept = {
                r: dict(sorted(s.items())[-4 * health.straggler_window :])
                for r, s in samples.items()
            }
            want = reference_verdicts(kept, node_of, health)
            assert {n: s for n, (s, _) in got.items()} == {n: s for n, (s, _) in want.items()}
            for node, (_, evidence) in got.items():
                assert {k: v for k, v in evidence.items() if k not in ("measure", "steps")} == (
                    want[node][1]  # type: ignore[index]
                )
    flagged = {n for n, v in watch.check_stragglers().items() if v.status is Verdict.DEGRADED}
    assert flagged == {slow}
