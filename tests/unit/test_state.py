"""State machines: documented states, allowed transitions, illegal moves raise."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainctl.state as state_module
from trainctl.state import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    NODE_TRANSITIONS,
    AttemptRecord,
    AttemptState,
    IllegalTransition,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
)


@pytest.mark.parametrize("table", [JOB_TRANSITIONS, ATTEMPT_TRANSITIONS, NODE_TRANSITIONS])
def test_every_state_has_a_row_and_a_docstring(table: dict) -> None:
    enum_type = type(next(iter(table)))
    assert set(table) == set(enum_type)
    source = Path(state_module.__file__).read_text()
    for state in enum_type:
        # each member is followed by its documented meaning
        assert f'{state.name} = "{state.value}"\n    """' in source


def test_job_lifecycle_and_illegal_moves() -> None:
    job = JobRecord(job_id="j", name="n", created_at=0.0, updated_at=0.0)
    job.move(JobState.RUNNING)
    job.move(JobState.RECOVERING)
    job.move(JobState.RUNNING)
    job.move(JobState.SUCCEEDED, "done")
    assert job.reason == "done" and job.state.terminal
    with pytest.raises(IllegalTransition, match="succeeded -> running"):
        job.move(JobState.RUNNING)


def test_failed_and_stopped_jobs_may_resume() -> None:
    for end in (JobState.FAILED, JobState.STOPPED):
        job = JobRecord(job_id="j", name="n", created_at=0.0, updated_at=0.0, state=end)
        job.move(JobState.RUNNING)


def test_node_and_attempt_moves() -> None:
    node = NodeRecord("node-0")
    node.move(NodeState.STARTING)
    node.move(NodeState.RUNNING)
    node.move(NodeState.FAILED, "exit 1")
    node.move(NodeState.EXCLUDED)
    with pytest.raises(IllegalTransition):
        node.move(NodeState.RUNNING)
    # readmitted after the exclusion expired: it starts (and probes) again
    node.move(NodeState.STARTING)
    node.move(NodeState.RUNNING)
    node.move(NodeState.STOPPED, "another node failed")
    node.move(NodeState.SPARE)  # back on standby
    attempt = AttemptRecord(number=0, started_at=0.0)
    attempt.move(AttemptState.RUNNING)
    attempt.move(AttemptState.FAILED)
    with pytest.raises(IllegalTransition):
        attempt.move(AttemptState.RUNNING)


def test_record_json_round_trip() -> None:
    job = JobRecord(
        job_id="j",
        name="n",
        created_at=1.0,
        updated_at=2.0,
        nodes=[NodeRecord("node-0", NodeState.RUNNING, pid=5)],
        attempts=[AttemptRecord(number=0, started_at=1.5, world_size=2)],
    )
    again = JobRecord.from_json(job.to_json())
    assert again == job
    assert job.to_json()["nodes"][0]["state"] == "running"
