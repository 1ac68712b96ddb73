"""The goodput ledger (pure): hand-checked scenarios and the property that the categories tile
the wall time, on clean and on messy inputs."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest

from trainctl.events import BadEvent, Event
from trainctl.report.goodput import build_ledger
from trainctl.report.ledger import CATEGORIES, Category, Ledger
from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState


def raw(
    time: Any, kind: str, attempt: Any = None, node: str | None = None, **data: Any
) -> dict[str, Any]:
    """An event as the store holds it (JSON)."""
    return {
        "time": time,
        "kind": kind,
        "message": kind,
        "node": node,
        "attempt": attempt,
        "data": data,
    }


def ev(
    time: float, kind: str, attempt: int | None = None, node: str | None = None, **data: Any
) -> Event:
    """An event read back as the store reads it (typed, validated)."""
    return Event.from_json(raw(time, kind, attempt, node, **data))


def job(
    state: JobState = JobState.SUCCEEDED, attempts: list[AttemptRecord] | None = None
) -> JobRecord:
    return JobRecord(
        "j1", "tiny", created_at=0.0, updated_at=0.0, state=state, attempts=attempts or []
    )


def started(time: float, n: int, nodes: list[str], world: int) -> Event:
    return ev(time, "attempt_started", n, nodes=nodes, world_size=world)


def ended(time: float, n: int, outcome: str, **data: Any) -> Event:
    return ev(time, "attempt_ended", n, outcome=outcome, **data)


def check_tiles(ledger: Ledger) -> None:
    """Segments are consecutive, non-empty, inside [start, end], and sum to the wall time."""
    assert ledger.wall_s >= 0
    cursor = ledger.start
    for segment in ledger.segments:
        assert segment.start == pytest.approx(cursor, abs=1e-9), ledger.segments
        assert segment.end > segment.start
        cursor = segment.end
    if ledger.segments:
        assert cursor == pytest.approx(ledger.end, abs=1e-9)
    totals = ledger.seconds
    assert set(totals) == {c.value for c in CATEGORIES}
    assert all(seconds >= 0 for seconds in totals.values())
    assert sum(totals.values()) == pytest.approx(ledger.wall_s, abs=1e-6)
    assert 0.0 <= ledger.goodput <= 1.0


# -- scenarios, hand-checked ----------------------------------------------------------------------
def clean_run() -> tuple[JobRecord, list[Event], float]:
    """One attempt, 100 steps at 1 s, one checkpoint stalling 0.5 s."""
    events = [
        ev(0, "job_created"),
        started(2, 1, ["n0", "n1"], 4),
        ev(10, "first_step", 1, step=1, restored_step=0),
        # save called at 60 - 3 = 57, training blocked until 57.5
        ev(60, "checkpoint_committed", 1, "n0", step=50, stall_s=0.5, durable_s=3.0),
        ended(
            110,
            1,
            "succeeded",
            first_step=1,
            first_step_at=10,
            last_step=100,
            last_step_at=109,
            decided_at=110,
        ),
        ev(111, "job_succeeded", exit_code=0),
    ]
    return job(), events, 1e9


def node_failure_with_spare() -> tuple[JobRecord, list[Event], float]:
    """n1 is killed after step 50; the spare n2 takes over from the step-40 checkpoint."""
    events = [
        ev(0, "job_created"),
        started(2, 1, ["n0", "n1"], 4),
        ev(10, "first_step", 1, step=1, restored_step=0),
        ev(52, "checkpoint_committed", 1, "n0", step=40, stall_s=1.0, durable_s=3.0),
        ev(59.5, "fault_injected", 1, "n1", fault="kill-node", step=50),
        ended(
            65,
            1,
            "failed",
            reason="n1: node agent lost",
            cause="node_fault",
            blamed="n1",
            first_step=1,
            first_step_at=10,
            last_step=50,
            last_step_at=59,
            failed_at=59.5,
            decided_at=64,
        ),
        ev(65, "node_excluded", None, "n1", reason="node agent lost", expires_at=4000),
        ev(65.5, "recovery", action="relaunch", next_attempt=2, nodes=["n0", "n2"]),
        started(66, 2, ["n0", "n2"], 4),
        ev(
            70,
            "checkpoint_restored",
            2,
            "n0",
            step=40,
            restore_s=2.0,
            saved_world_size=4,
            world_size=4,
        ),
        ev(72, "first_step", 2, step=41, restored_step=40),
        ended(
            132,
            2,
            "succeeded",
            first_step=41,
            first_step_at=72,
            last_step=100,
            last_step_at=131,
            restored_step=40,
            decided_at=131.5,
        ),
        ev(132, "job_succeeded", exit_code=0),
    ]
    return job(), events, 1e9


def shrink() -> tuple[JobRecord, list[Event], float]:
    """No spare: attempt 2 runs on one node, at 2 s a step instead of 1 s."""
    events = [
        ev(0, "job_created"),
        started(0, 1, ["n0", "n1"], 4),
        ev(5, "first_step", 1, step=1, restored_step=0),
        ended(
            60,
            1,
            "failed",
            reason="n1 exited with 1",
            cause="worker_crash",
            blamed="n1",
            first_step=1,
            first_step_at=5,
            last_step=50,
            last_step_at=54,
            failed_at=None,
            decided_at=58,
        ),
        started(61, 2, ["n0"], 2),
        ev(
            66,
            "checkpoint_restored",
            2,
            "n0",
            step=40,
            restore_s=3.0,
            saved_world_size=4,
            world_size=2,
        ),
        ev(70, "first_step", 2, step=41, restored_step=40),
        ended(
            189,
            2,
            "succeeded",
            first_step=41,
            first_step_at=70,
            last_step=100,
            last_step_at=188,
            decided_at=189,
        ),
        ev(190, "job_succeeded", exit_code=0),
    ]
    return job(), events, 1e9


def controller_killed_then_resumed() -> tuple[JobRecord, list[Event], float]:
    """The controller dies after step 50 (t=55); `trainctl resume` at t=300."""
    events = [
        ev(0, "job_created"),
        started(1, 1, ["n0"], 2),
        ev(6, "first_step", 1, step=1, restored_step=0),
        ev(46, "checkpoint_committed", 1, "n0", step=40, stall_s=0.0, durable_s=2.0),
        # written by `trainctl resume`:
        ended(
            300,
            1,
            "controller_lost",
            reason="controller lost",
            cause="controller_lost",
            first_step=1,
            first_step_at=6,
            last_step=50,
            last_step_at=55,
            failed_at=55,
            decided_at=300,
        ),
        ev(300, "job_resumed", committed_step=40),
        started(302, 2, ["n0"], 2),
        ev(306, "checkpoint_restored", 2, "n0", step=40, restore_s=2.0),
        ev(308, "first_step", 2, step=41, restored_step=40),
        ended(
            368,
            2,
            "succeeded",
            first_step=41,
            first_step_at=308,
            last_step=100,
            last_step_at=367,
            decided_at=368,
        ),
        ev(369, "job_succeeded", exit_code=0),
    ]
    return job(), events, 1e9


def crash_loop() -> tuple[JobRecord, list[Event], float]:
    """Three attempts crash before their first step; trainctl gives up."""
    events = [ev(0, "job_created")]
    for n, at in ((1, 1.0), (2, 7.0), (3, 13.0)):
        events += [
            started(at, n, ["n0"], 2),
            ended(
                at + 4,
                n,
                "failed",
                reason="ImportError in train.py",
                cause="software_error",
                blamed=None,
                failed_at=at + 3,
                decided_at=at + 4,
            ),
        ]
    events.append(ev(18, "job_gave_up", exit_code=3))
    return job(JobState.FAILED), events, 1e9


def requeued_then_resumed() -> tuple[JobRecord, list[Event], float]:
    """Preempted (stopped, exit 4), pending in the queue, resumed by the requeued allocation."""
    events = [
        ev(0, "job_created"),
        started(0, 1, ["n0"], 2),
        ev(10, "first_step", 1, step=1),
        ended(
            51,
            1,
            "stopped",
            reason="SIGTERM",
            cause="preemption",
            first_step=1,
            first_step_at=10,
            last_step=40,
            last_step_at=49,
            decided_at=50,
        ),
        ev(52, "job_stopped", exit_code=4),
        ev(400, "job_resumed"),
        started(405, 2, ["n0"], 2),
        ev(410, "checkpoint_restored", 2, step=40, restore_s=1.0),
        ev(412, "first_step", 2, step=41, restored_step=40),
        ended(
            472,
            2,
            "succeeded",
            first_step=41,
            first_step_at=412,
            last_step=100,
            last_step_at=471,
            decided_at=472,
        ),
        ev(472, "job_succeeded", exit_code=0),
    ]
    return job(), events, 1e9


def live_mid_run() -> tuple[JobRecord, list[Event], float]:
    """Still running: the wall time ends at `now`; time since the last step is not yet known."""
    record = job(
        JobState.RUNNING,
        [
            AttemptRecord(
                1,
                started_at=1,
                state=AttemptState.RUNNING,
                first_step=1,
                first_step_at=5,
                last_step=30,
                last_step_at=34,
            )
        ],
    )
    events = [ev(0, "job_created"), started(1, 1, ["n0"], 2), ev(5, "first_step", 1, step=1)]
    return record, events, 35.0


SCENARIOS = {
    # wall 111: startup 0→10; steps 10→109 less a 0.5 s stall; 109→111 finishing.
    "clean": (
        clean_run,
        111,
        {"startup": 10, "productive": 98.5, "checkpoint_stall": 0.5, "waiting": 2},
    ),
    # wall 132: startup 10; steps 10→59 (49) less a 1 s stall; 59→59.5 lost work; detection
    # 59.5→64; restart 64→72 less the 2 s restore; steps 42..50 redone at 1 s (9, the first
    # redone step is inside restart); steps 51..100 50 s; 131→132 finishing.
    "node failure, spare": (
        node_failure_with_spare,
        132,
        {
            "startup": 10,
            "productive": 48 + 50,
            "checkpoint_stall": 1,
            "waiting": 0.5 + 1,
            "failure_detection": 4.5,
            "restart": 6,
            "restore": 2,
            "replayed": 9,
        },
    ),
    # wall 190: detection from the last step (no fault injected, failed_at null): 54→58;
    # restart 58→70 less 3; replay (50 - 41) steps × 2 s.
    "shrink": (
        shrink,
        190,
        {
            "startup": 5,
            "productive": 49 + 100,
            "failure_detection": 4,
            "restart": 9,
            "restore": 3,
            "replayed": 18,
            "waiting": 2,
        },
    ),
    # wall 369: the dead controller's gap 55→300 is waiting; restart 300→308 less 2.
    "controller killed, resumed": (
        controller_killed_then_resumed,
        369,
        {
            "startup": 6,
            "productive": 49 + 50,
            "waiting": 245 + 2,
            "restart": 6,
            "restore": 2,
            "replayed": 9,
        },
    ),
    # wall 18: no step ever; startup 0→4, detection 1 s each, restart 5→10 and 11→16.
    "crash loop": (
        crash_loop,
        18,
        {"startup": 4, "failure_detection": 3, "restart": 10, "waiting": 1},
    ),
    # wall 472: detection 49→50 (the stop); 50→400 waiting (queue); restart 400→412 less 1.
    # Attempt 2 restored step 40, the last step attempt 1 reached: nothing is replayed.
    "requeued": (
        requeued_then_resumed,
        472,
        {
            "startup": 10,
            "productive": 39 + 59,
            "failure_detection": 1,
            "waiting": 350 + 1,
            "restart": 11,
            "restore": 1,
        },
    ),
    # wall 35 (now): startup 0→5, steps 5→34, one second since the last reported step.
    "live": (live_mid_run, 35, {"startup": 5, "productive": 29, "waiting": 1}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenarios_hand_checked(name: str) -> None:
    make, wall, expected = SCENARIOS[name]
    ledger = build_ledger(*make())
    check_tiles(ledger)
    assert ledger.wall_s == pytest.approx(wall)
    want = {c.value: 0.0 for c in CATEGORIES} | {k: float(v) for k, v in expected.items()}
    assert ledger.seconds == pytest.approx(want), ledger.segments
    assert ledger.goodput == pytest.approx(want["productive"] / wall)


def test_goodput_numbers() -> None:
    assert build_ledger(*clean_run()).goodput == pytest.approx(98.5 / 111)
    assert build_ledger(*node_failure_with_spare()).goodput == pytest.approx(98 / 132)
    assert build_ledger(*crash_loop()).goodput == 0.0


def test_attempt_rows_failures_and_checkpoints() -> None:
    ledger = build_ledger(*node_failure_with_spare())
    first, second = ledger.attempts
    assert (first.number, first.nodes, first.world_size, first.outcome) == (
        1,
        ("n0", "n1"),
        4,
        "failed",
    )
    assert (first.cause, first.blamed, first.last_step, first.failed_at) == (
        "node_fault",
        "n1",
        50,
        59.5,
    )
    assert (second.restored_step, second.first_step, second.first_step_at) == (40, 41, 72)
    assert second.restore_s == 2.0 and second.mean_step_s == pytest.approx(1.0)
    (failure,) = ledger.failures
    assert (failure.time, failure.node, failure.cause, failure.fault) == (
        59.5,
        "n1",
        "node_fault",
        "kill-node",
    )
    assert [(c.step, c.attempt) for c in ledger.checkpoints] == [(40, 1)]
    replayed = [s for s in ledger.segments if s.category is Category.REPLAYED]
    assert [(s.start, s.end, s.attempt) for s in replayed] == [(72, 81, 2)]
    between = [s for s in ledger.segments if s.attempt is None]
    assert [(s.category, s.start, s.end) for s in between][-1] == (Category.RESTART, 64, 66)


def test_to_json_is_plain_data() -> None:
    data = build_ledger(*crash_loop()).to_json()
    assert data["wall_s"] == 18 and data["goodput"] == 0.0
    assert [a["outcome"] for a in data["attempts"]] == ["failed"] * 3
    assert {f["cause"] for f in data["failures"]} == {"software_error"}
    assert sum(data["categories"].values()) == pytest.approx(18)


# -- messy inputs ---------------------------------------------------------------------------------
def test_state_record_only_no_events() -> None:
    """Events lost: the ledger works from state.json's attempts alone."""
    record = job(
        JobState.SUCCEEDED,
        [
            AttemptRecord(
                1,
                started_at=0,
                state=AttemptState.FAILED,
                ended_at=30,
                first_step=1,
                first_step_at=5,
                last_step=20,
                last_step_at=24,
                cause="worker_crash",
            ),
            AttemptRecord(
                2,
                started_at=31,
                state=AttemptState.SUCCEEDED,
                ended_at=80,
                first_step=11,
                first_step_at=35,
                restored_step=10,
                last_step=50,
                last_step_at=74,
            ),
        ],
    )
    ledger = build_ledger(record, [], now=1e9)
    check_tiles(ledger)
    assert (ledger.start, ledger.end) == (0, 80)
    # 24→30 detection; replay (20 - 11) × 1 s.
    assert ledger.seconds["failure_detection"] == pytest.approx(6)
    assert ledger.seconds["replayed"] == pytest.approx(9)


def test_controller_died_not_resumed_is_waiting_not_progress() -> None:
    """Nobody ran `trainctl resume`: the state still says running; the silence is waiting."""
    _, events, _ = controller_killed_then_resumed()
    record = job(
        JobState.RUNNING,
        [
            AttemptRecord(
                1,
                started_at=1,
                state=AttemptState.RUNNING,
                first_step=1,
                first_step_at=6,
                last_step=50,
                last_step_at=55,
            )
        ],
    )
    ledger = build_ledger(record, [e for e in events if e.time < 300], now=500)
    check_tiles(ledger)
    assert ledger.live and ledger.end == 500 and ledger.attempts[0].outcome == "running"
    assert ledger.seconds["productive"] == pytest.approx(49)
    assert ledger.seconds["waiting"] == pytest.approx(445)


def test_resumed_job_between_attempts_is_live() -> None:
    """`trainctl resume` ran (the job's end is behind it) but no attempt has started yet."""
    _, events, _ = controller_killed_then_resumed()
    ledger = build_ledger(job(JobState.RECOVERING), [e for e in events if e.time <= 300], 301)
    check_tiles(ledger)
    assert ledger.live and ledger.end == 301
    assert ledger.seconds["waiting"] == pytest.approx(245)
    assert ledger.seconds["restart"] == pytest.approx(1)


def test_overlapping_attempts_and_duplicates_still_tile() -> None:
    events = [
        ev(0, "job_created"),
        started(1, 1, ["n0"], 2),
        started(1.5, 1, ["n0"], 2),  # duplicated
        ev(5, "first_step", 1, step=1),
        started(20, 2, ["n1"], 2),  # starts before attempt 1 ended
        ended(
            30,
            1,
            "failed",
            last_step=40,
            last_step_at=29,
            first_step=1,
            first_step_at=5,
            decided_at=31,
        ),
        ev(25, "first_step", 2, step=41, restored_step=40),
        ended(28, 2, "succeeded", last_step=45, last_step_at=27, decided_at=28),
        ended(28, 2, "succeeded", last_step=45, last_step_at=27, decided_at=28),
        ev(35, "checkpoint_committed", 2, step=45, stall_s=50.0, durable_s=1.0),
        ev(40, "job_succeeded"),
    ]
    ledger = build_ledger(job(), events, now=1e9)
    check_tiles(ledger)
    assert [a.number for a in ledger.attempts] == [1, 2]


def test_garbage_fields_never_reach_the_ledger() -> None:
    """Events whose fields do not fit their kind are refused when read (the store skips them
    with a warning); the ledger of what remains still tiles."""
    garbage = [
        raw(1, "attempt_started", 1, nodes="not-a-list", world_size="four"),
        raw(5, "first_step", 1, step="x", restored_step=None),
        raw(9, "checkpoint_committed", 1, step=None, stall_s="slow", durable_s=math.nan),
        raw(10, "attempt_ended", 1, outcome="exploded", last_step=[1], decided_at=math.inf),
        {"time": 11, "kind": "job_failed", "message": "x", "data": "not a dict"},
        {"time": "soon", "kind": "job_created"},
        {"v": 99, "time": 1, "kind": "job_created"},
    ]
    for item in garbage:
        with pytest.raises(BadEvent):
            Event.from_json(item)
    events = [
        ev(0, "job_created"),
        ev(9.5, "checkpoint_restored", 1, step=3, restore_s=-4),
        ev(10, "attempt_ended", 1, outcome="exploded", last_step=True, decided_at=10),
        ev(11, "job_failed", exit_code=1),
    ]
    ledger = build_ledger(job(JobState.FAILED), events, now=1e9)
    check_tiles(ledger)
    assert ledger.end == 11 and ledger.attempts[0].outcome == "exploded"


def test_empty_and_pending_jobs() -> None:
    pending = build_ledger(job(JobState.PENDING), [], now=10.0)
    check_tiles(pending)
    assert pending.seconds["waiting"] == 10 and pending.live
    now_before_creation = build_ledger(job(JobState.RUNNING), [], now=-5.0)
    check_tiles(now_before_creation)
    assert now_before_creation.wall_s == 0 and now_before_creation.goodput == 0


_KINDS = (
    "job_created",
    "attempt_started",
    "first_step",
    "checkpoint_restored",
    "checkpoint_committed",
    "fault_injected",
    "attempt_ended",
    "node_excluded",
    "recovery",
    "job_resumed",
    "job_succeeded",
    "job_failed",
    "job_stopped",
    "job_gave_up",
    "other",
)
_OUTCOMES = ("succeeded", "failed", "stopped", "controller_lost", "weird", None)


def _random_value(rng: random.Random, scale: float) -> Any:
    return rng.choice([None, rng.uniform(-5, scale), rng.randint(0, 200), "x", math.nan, True])


def _random_job(rng: random.Random) -> tuple[JobRecord, list[Event], float]:
    events = []
    for _ in range(rng.randint(0, 40)):
        time = rng.uniform(-10, 500)
        data = {
            key: _random_value(rng, 500)
            for key in (
                "step",
                "stall_s",
                "durable_s",
                "restore_s",
                "restored_step",
                "first_step",
                "first_step_at",
                "last_step",
                "last_step_at",
                "failed_at",
                "decided_at",
            )
            if rng.random() < 0.5
        }
        if rng.random() < 0.7:
            data["outcome"] = rng.choice(_OUTCOMES)
        attempt = rng.choice([None, 1, 2, 3, 4, "2", -1])
        stamp: Any = rng.choice([time, time, time, str(time), None, math.inf])
        kind = rng.choice(_KINDS)
        try:  # as the store reads them: events that do not fit their kind are skipped
            events.append(
                Event.from_json(raw(stamp, kind, attempt, rng.choice([None, "n0"]), **data))
            )
        except BadEvent:
            continue
    attempts = [
        AttemptRecord(
            number=n,
            started_at=rng.uniform(0, 400),
            state=rng.choice(list(AttemptState)),
            ended_at=rng.choice([None, rng.uniform(0, 500)]),
            first_step=rng.choice([None, rng.randint(0, 50)]),
            first_step_at=rng.choice([None, rng.uniform(0, 500)]),
            last_step=rng.choice([None, rng.randint(0, 200)]),
            last_step_at=rng.choice([None, rng.uniform(0, 500)]),
            restored_step=rng.choice([None, 0, rng.randint(0, 100)]),
            cause=rng.choice([None, "controller_lost", "node_fault"]),
        )
        for n in range(1, rng.randint(0, 4) + 1)
    ]
    record = dataclasses.replace(job(rng.choice(list(JobState))), attempts=attempts)
    return record, events, rng.uniform(-20, 800)


@pytest.mark.parametrize("seed", range(300))
def test_categories_always_sum_to_wall_time(seed: int) -> None:
    ledger = build_ledger(*_random_job(random.Random(seed)))
    check_tiles(ledger)
    ledger.to_json()


def test_restore_tier_is_named_in_the_attempt_and_its_segment() -> None:
    """A restore from the memory tier shows as such (`checkpoint_restored`'s ``tier``)."""
    record, events, now = controller_killed_then_resumed()
    events = [
        ev(306, "checkpoint_restored", 2, "n0", step=40, restore_s=2.0, tier="memory")
        if e.kind == "checkpoint_restored"
        else e
        for e in events
    ]
    ledger = build_ledger(record, events, now)
    check_tiles(ledger)
    assert [a.restore_tier for a in ledger.attempts] == [None, "memory"]
    restores = [s.label for s in ledger.segments if s.category.value == "restore"]
    assert restores == ["restore step 40 from memory"]
    plain = build_ledger(*controller_killed_then_resumed())
    assert [s.label for s in plain.segments if s.category.value == "restore"] == ["restore step 40"]
