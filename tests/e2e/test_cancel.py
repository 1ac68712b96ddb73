"""`trainctl cancel` from a second process: the running job's controller stops every process
within about a second, records who and why, and exits 7; `resume` refuses the cancelled job
unless `--force`. And a job with no live controller is marked cancelled by `cancel` itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.e2e.harness import (
    SLOW,
    assert_no_leftovers,
    events,
    read_state,
    start_launch,
    trainctl,
    wait_for_step,
    write_recipe,
)
from trainctl.exitcodes import ExitCode
from trainctl.recipe import load_recipe, spec_to_yaml
from trainctl.recovery.journal import new_record
from trainctl.state import JobState
from trainctl.store import JobStore


def test_cancel_from_another_shell_stops_the_job_and_resume_needs_force(
    storage: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "to-cancel", config={**SLOW}, max_steps=200)
    proc = start_launch(str(recipe), job_id="to-cancel", storage=storage)
    try:
        wait_for_step(storage, "to-cancel", 3)
        asked = time.monotonic()
        result = trainctl(
            "cancel", "to-cancel", "--reason", "wrong learning rate", "--json", storage=storage
        )
        answered = time.monotonic() - asked
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers("to-cancel")
    assert result.returncode == 0, result.stderr
    shown = result.json()
    assert shown["state"] == "cancelled" and shown["cancel"]["reason"] == "wrong learning rate"
    assert "@" in shown["cancel"]["by"]
    assert proc.returncode == ExitCode.CANCELLED, err
    assert answered < 30  # the controller acted; `cancel` did not give up waiting
    state = read_state(storage, "to-cancel")
    assert state["state"] == "cancelled"
    assert state["reason"].startswith("cancelled by ") and "wrong learning rate" in state["reason"]
    assert state["exit_code"] == ExitCode.CANCELLED
    ended = [e for e in events(storage, "to-cancel") if e["kind"] == "job_cancelled"]
    assert len(ended) == 1 and ended[0]["data"]["by"] == shown["cancel"]["by"]
    requests = list((storage / "jobs" / "to-cancel" / "cancel").glob("*.json"))
    assert len(requests) == 1  # the request stays, as written

    again = trainctl("cancel", "to-cancel", storage=storage)
    assert again.returncode == 0 and "already cancelled" in again.stderr

    refused = trainctl("resume", "to-cancel", storage=storage)
    assert refused.returncode == ExitCode.BAD_INPUT
    assert "was cancelled" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    try:
        forced = trainctl(
            "resume", "to-cancel", "--force", "--json", storage=storage, timeout_s=180
        )
    finally:
        assert_no_leftovers("to-cancel")
    assert forced.returncode == 0, forced.stderr
    assert forced.json()["state"] == "succeeded"
    assert read_state(storage, "to-cancel")["cancels_cleared"] == [requests[0].stem]


def test_a_job_without_a_live_controller_is_cancelled_by_cancel_itself(
    storage: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "orphan")
    spec = load_recipe(recipe)
    store = JobStore(str(storage))
    record = new_record("orphan", spec, time.time())
    record.move(JobState.RUNNING, "its controller died without a word")
    store.create(record, spec_to_yaml(spec))
    result = trainctl("cancel", "orphan", "--wait", "1", "--json", storage=storage)
    assert result.returncode == 0, result.stderr
    state = read_state(storage, "orphan")
    assert state["state"] == "cancelled" and state["cancel"]["by"] == result.json()["cancel"]["by"]
    assert [e["kind"] for e in events(storage, "orphan")][-1] == "job_cancelled"
    missing = trainctl("cancel", "nope", storage=storage)
    assert missing.returncode == ExitCode.BAD_INPUT and "no such job" in missing.stderr
    assert json.loads(json.dumps(state))["exit_code"] == ExitCode.CANCELLED
