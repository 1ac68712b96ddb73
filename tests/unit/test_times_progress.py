"""Pure pieces of the CLI's conventions, as tables: how times are shown, when a plain progress
line is due and what it says, and a node's standing beside its last health verdict."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from trainctl.cli.console import NORMAL, QUIET, terminal
from trainctl.cli.health import node_standing
from trainctl.cli.progress import Meter, Reported, StepProgress, plain_line_due, progress_text
from trainctl.cli.times import iso_timestamps, wall_and_age
from trainctl.state import AttemptRecord, JobRecord, NodeRecord, NodeState

NOON = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("timestamp", "shown"),
    [
        (NOON - 13 * 60, "11:47:00 UTC (13m ago)"),  # today: the date is left out
        (NOON - 20, "11:59:40 UTC (20s ago)"),
        (NOON, "12:00:00 UTC (0s ago)"),
        (NOON + 300, "12:05:00 UTC (in 5m)"),
        (NOON - 3 * 86400, "2026-12-01 12:00:00 UTC (3d ago)"),
        (NOON - 13 * 3600, "2026-12-03 23:00:00 UTC (13h ago)"),  # yesterday, UTC
    ],
)
def test_wall_and_age(timestamp: float, shown: str) -> None:
    assert wall_and_age(timestamp, NOON) == shown


def test_iso_timestamps_converts_times_only() -> None:
    document = {
        "created_at": NOON,
        "time": 0,
        "last_heard_s": 42.5,  # a duration
        "step": 7,
        "started": True,
        "nodes": [{"checked_at": 1.5, "since": None, "name": "n0"}],
        "excluded": {"n1": {"expires_at": NOON, "until": "2026-12-04T12:00:00+00:00"}},
        "segments": [{"start": NOON, "end": NOON + 1, "category": "productive"}],
    }
    assert iso_timestamps(document) == {
        "created_at": "2026-12-04T12:00:00+00:00",
        "time": "1970-01-01T00:00:00+00:00",
        "last_heard_s": 42.5,
        "step": 7,
        "started": True,
        "nodes": [{"checked_at": "1970-01-01T00:00:01.500000+00:00", "since": None, "name": "n0"}],
        "excluded": {
            "n1": {"expires_at": "2026-12-04T12:00:00+00:00", "until": "2026-12-04T12:00:00+00:00"}
        },
        "segments": [
            {
                "start": "2026-12-04T12:00:00+00:00",
                "end": "2026-12-04T12:00:01+00:00",
                "category": "productive",
            }
        ],
    }


@pytest.mark.parametrize(
    ("done", "total", "last", "now", "due"),
    [
        (0, 100, None, 0.0, True),  # the first line
        (5, 100, Reported(0, 0.0), 1.0, False),  # within the same tenth, soon after
        (10, 100, Reported(5, 0.0), 1.0, True),  # a new tenth
        (19, 100, Reported(10, 0.0), 1.0, False),
        (35, 100, Reported(19, 0.0), 1.0, True),  # two tenths at once: one line
        (100, 100, Reported(95, 0.0), 1.0, True),  # the end
        (12, 100, Reported(11, 0.0), 30.0, True),  # 30 s since the last line, and it moved
        (11, 100, Reported(11, 0.0), 99.0, False),  # nothing moved: no line however long
        (7, None, Reported(3, 0.0), 10.0, False),  # no total: by time only
        (7, None, Reported(3, 0.0), 31.0, True),
    ],
)
def test_plain_line_due(
    done: float, total: float | None, last: Reported | None, now: float, due: bool
) -> None:
    assert plain_line_due(done, total, last, now, every_s=30.0) is due


@pytest.mark.parametrize(
    ("done", "total", "rate", "text"),
    [
        (40, 100, 3.2, "step 40/100 (40%), 3.2 steps/s, ETA 19s"),
        (40, 100, None, "step 40/100 (40%)"),
        (100, 100, 2.0, "step 100/100 (100%), 2 steps/s"),
        (40, None, 0.5, "step 40, 0.5 steps/s"),
        (10, 1000, 0.1, "step 10/1000 (1%), 0.1 steps/s, ETA 3h"),
    ],
)
def test_progress_text(done: float, total: float | None, rate: float | None, text: str) -> None:
    assert progress_text("step", done, total, rate, "steps") == text


def test_meter_without_a_terminal_prints_a_line_per_tenth_with_rate_and_eta(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = iter(float(t) for t in range(100))
    terminal.verbosity = NORMAL
    with Meter("step", 50, clock=lambda: next(clock)) as meter:
        for step in range(1, 51):
            meter.update(step)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "step 1/50 (2%)"
    assert lines[1] == "step 5/50 (10%), 1 steps/s, ETA 45s"
    assert lines[-1] == "step 50/50 (100%), 1 steps/s"
    assert len(lines) == 11


def test_meter_is_silent_with_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    terminal.verbosity = QUIET
    try:
        with Meter("step", 10) as meter:
            for step in range(11):
                meter.update(step)
    finally:
        terminal.verbosity = NORMAL
    assert capsys.readouterr() == ("", "")


def _record(*states: NodeState) -> JobRecord:
    record = JobRecord(job_id="j", name="n", created_at=0.0, updated_at=0.0)
    record.nodes = [NodeRecord(name=f"node-{i}", state=state) for i, state in enumerate(states)]
    return record


@pytest.mark.parametrize(
    ("states", "blocked", "standing"),
    [
        ((NodeState.RUNNING, NodeState.RUNNING), {}, ["running", "running"]),
        # killed and excluded: out of the job whatever its last verdict said
        ((NodeState.RUNNING, NodeState.FAILED), {"node-1": 100.0}, ["running", "excluded"]),
        ((NodeState.RUNNING, NodeState.FAILED), {}, ["running", "failed"]),  # lost, not excluded
        ((NodeState.RUNNING, NodeState.FAILED), {"node-1": 5.0}, ["running", "failed"]),  # lapsed
        ((NodeState.STOPPED, NodeState.SPARE), {}, ["stopped", "spare"]),
    ],
)
def test_node_standing(
    states: tuple[NodeState, ...], blocked: dict[str, float], standing: list[str]
) -> None:
    blocklist = {node: {"reason": "x", "expires_at": until} for node, until in blocked.items()}
    shown = node_standing(_record(*states), blocklist, now=10.0)
    assert [shown[f"node-{i}"] for i in range(len(states))] == standing


def test_node_standing_without_a_job_record_knows_only_the_blocklist() -> None:
    assert node_standing(None, {"n3": {"expires_at": 20.0}}, now=10.0) == {"n3": "excluded"}


def test_step_progress_of_a_resume_announces_only_the_new_attempt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`resume` picks up a job whose attempt 0 reached step 20: nothing is said of attempt 0;
    attempt 1's restore, first step and steps are (plain lines: stderr is no terminal)."""
    terminal.verbosity = NORMAL
    record = JobRecord(job_id="j", name="n", created_at=0.0, updated_at=0.0)
    old = AttemptRecord(number=0, started_at=0.0, first_step_at=5.0)
    record.attempts.append(old)
    record.step = 20
    progress = StepProgress(record, max_steps=40, resuming=True)
    progress.poll()
    record.attempts.append(AttemptRecord(number=1, started_at=100.0))
    progress.poll()  # restoring: a terminal's bar says so; plain output waits for the step
    assert capsys.readouterr() == ("", "")
    record.attempts[-1].first_step_at, record.attempts[-1].restored_step = 103.0, 20
    record.step = 21
    progress.poll()
    assert capsys.readouterr().err.splitlines() == [
        "attempt 1: restored step 20, first step after 3s",
        "step 21/40 (52%)",
    ]
