"""The controller's progress bookkeeping fed to the pure detectors (times passed in)."""

from __future__ import annotations

from trainctl.health.verdict import Verdict
from trainctl.protocol import Heartbeat
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
