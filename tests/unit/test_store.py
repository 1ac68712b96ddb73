"""A store that survives: whole events, clear errors for files that cannot be read, skipped
bad events with a warning naming them, stores of the previous version, files others may read.

CLI checks run `trainctl` as a user would (a subprocess in the sealed environment).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from tests.conftest import S3Endpoint
from tests.e2e.harness import trainctl
from trainctl.errors import CorruptStoreError
from trainctl.events import AttemptEnded, AttemptStarted, Event, JobCreated, JobSucceeded
from trainctl.exitcodes import ExitCode
from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState
from trainctl.store import JobStore

JOB = "robust"


def make_job(root: Path | str) -> JobStore:
    store = JobStore(str(root))
    record = JobRecord(JOB, "tiny", created_at=100.0, updated_at=100.0, state=JobState.SUCCEEDED)
    record.attempts.append(
        AttemptRecord(0, 101.0, state=AttemptState.SUCCEEDED, ended_at=130.0, nodes=["node-0"])
    )
    store.create(record, "name: tiny\nscript: /x.py\n")
    for event in (
        Event(100.0, "tiny: 1 node(s)", JobCreated(target="x.yaml")),
        Event(101.0, "attempt 0", AttemptStarted(nodes=["node-0"], world_size=1), attempt=0),
        Event(130.0, "attempt 0 succeeded", AttemptEnded(outcome="succeeded"), attempt=0),
        Event(131.0, "every node finished", JobSucceeded(exit_code=0)),
    ):
        store.append_event(JOB, event)
    return store


def events_dir(root: Path) -> Path:
    return root / "jobs" / JOB / "events"


def test_events_are_written_whole_under_concurrent_writers(storage: Path) -> None:
    store = make_job(storage)

    def write(n: int) -> None:
        for i in range(50):
            store.append_event(JOB, Event(200.0 + i, f"w{n}-{i}", JobCreated()))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = os.listdir(events_dir(storage))
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    log = store.read_events(JOB)
    assert log.problems == [] and len(log.events) == 4 + 6 * 50
    assert all(json.loads((events_dir(storage) / n).read_text())["v"] == 2 for n in names)


def test_store_files_are_readable_by_others(storage: Path) -> None:
    previous = os.umask(0o022)
    try:
        make_job(storage)
    finally:
        os.umask(previous)
    for path in (storage / "jobs" / JOB).rglob("*.json"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path


def test_a_job_file_path_must_stay_inside_the_job(storage: Path) -> None:
    store = make_job(storage)
    for bad in ("../escape.txt", "stacks/../../x", "", "/"):
        with pytest.raises(ValueError):
            store.write_job_file(JOB, bad, b"x")
    assert store.write_job_file(JOB, "stacks/attempt-0/node-0-rank-0.txt", b"ok").endswith(".txt")


def test_bad_events_are_skipped_with_a_warning_naming_them(storage: Path) -> None:
    make_job(storage)
    partial = events_dir(storage) / "00000000125000000-1-000000-first_step.json"
    partial.write_text('{"v": 2, "time": 125.0, "kind": "first_st')  # a crash mid-write
    wrong = events_dir(storage) / "00000000126000000-1-000001-first_step.json"
    wrong.write_text(json.dumps({"time": 126.0, "kind": "first_step", "data": {"step": "ten"}}))
    newer = events_dir(storage) / "00000000127000000-1-000002-later.json"
    newer.write_text(json.dumps({"v": 9, "time": 127.0, "kind": "later"}))
    for command in ("events", "report"):
        result = trainctl(command, JOB, storage=storage)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        for path, why in ((partial, "not JSON"), (wrong, "first_step: step"), (newer, "upgrade")):
            line = next(li for li in result.stderr.splitlines() if path.name in li)
            assert why in line, result.stderr
    listed = trainctl("events", JOB, "--json", storage=storage).json()
    assert [e["kind"] for e in listed] == [
        "job_created",
        "attempt_started",
        "attempt_ended",
        "job_succeeded",
    ]


@pytest.mark.parametrize(
    "content",
    ['{"job_id": "robust", "name": "tiny", "crea', '{"job_id": "robust", "state": 7}', "[]"],
)
def test_a_corrupt_state_file_is_one_message_and_its_own_exit_code(
    storage: Path, content: str
) -> None:
    make_job(storage)
    state = storage / "jobs" / JOB / "state.json"
    state.write_text(content)
    for command in ("status", "events", "report", "resume"):
        result = trainctl(command, JOB, storage=storage)
        assert result.returncode == ExitCode.STORE_CORRUPT, (command, result.stderr)
        assert str(state) in result.stderr and "unreadable" in result.stderr
        assert "Traceback" not in result.stderr
    listed = trainctl("list", storage=storage)
    assert listed.returncode == 0 and JOB in listed.stderr + listed.stdout


def test_corrupt_node_file_warns_and_corrupt_blocklist_stops(storage: Path) -> None:
    make_job(storage)
    nodes = storage / "jobs" / JOB / "nodes"
    nodes.mkdir()
    (nodes / "node-0.json").write_text("{")
    status = trainctl("status", JOB, storage=storage)
    assert status.returncode == 0 and "node-0.json: skipped: not JSON" in status.stderr
    (storage / "jobs" / JOB / "blocklist.json").write_text('{"nodes": {"node-1": 3}}')
    status = trainctl("status", JOB, storage=storage)
    assert status.returncode == ExitCode.STORE_CORRUPT and "blocklist.json" in status.stderr


def test_a_store_written_by_the_previous_version_still_reads(storage: Path) -> None:
    """Version 1 wrote events without ``v`` and state.json without ``version``."""
    job = storage / "jobs" / "old"
    (job / "events").mkdir(parents=True)
    (job / "spec.yaml").write_text("name: old\nscript: /x.py\n")
    (job / "state.json").write_text(
        json.dumps(
            {
                "job_id": "old",
                "name": "old",
                "created_at": 1.0,
                "updated_at": 9.0,
                "state": "succeeded",
                "reason": "every node finished",
                "nodes": [{"name": "node-0", "state": "succeeded", "pid": 5, "host": "h"}],
                "attempts": [
                    {"number": 0, "started_at": 2.0, "state": "succeeded", "nodes": ["node-0"]}
                ],
                "restarts": {},
                "failures": [],
                "faults_fired": [],
            }
        )
    )
    old_events = [
        {
            "time": 1.0,
            "kind": "job_created",
            "message": "m",
            "node": None,
            "attempt": None,
            "data": {"target": "x"},
        },
        {
            "time": 2.0,
            "kind": "attempt_started",
            "message": "m",
            "node": None,
            "attempt": 0,
            "data": {
                "nodes": ["node-0"],
                "world_size": 1,
                "rdzv": "h:1",
                "promoted": [],
                "shrunk": False,
                "excluded": [],
            },
        },
        {
            "time": 3.0,
            "kind": "first_step",
            "message": "m",
            "node": "node-0",
            "attempt": 0,
            "data": {"step": 1, "restored_step": 0},
        },
        {
            "time": 8.0,
            "kind": "attempt_ended",
            "message": "m",
            "node": None,
            "attempt": 0,
            "data": {
                "outcome": "succeeded",
                "reason": "r",
                "cause": None,
                "blamed": None,
                "first_step": 1,
                "first_step_at": 3.0,
                "last_step": 5,
                "last_step_at": 7.5,
                "restored_step": None,
                "failed_at": None,
                "decided_at": 8.0,
            },
        },
        {
            "time": 9.0,
            "kind": "job_succeeded",
            "message": "m",
            "node": None,
            "attempt": None,
            "data": {"exit_code": 0, "blamed": None},
        },
    ]
    for i, raw in enumerate(old_events):
        (job / "events" / f"{int(raw['time'] * 1e6):017d}-1-{i:06d}-{raw['kind']}.json").write_text(
            json.dumps(raw)
        )
    status = trainctl("status", "old", "--json", storage=storage)
    assert status.returncode == 0 and status.json()["state"] == "succeeded"
    report = trainctl("report", "old", "--json", storage=storage)
    assert report.returncode == 0 and report.stderr.count("skipped") == 0, report.stderr
    assert report.json()["categories"]["productive"] == pytest.approx(4.5)


def test_s3_events_are_created_once(s3: S3Endpoint) -> None:
    store = JobStore(s3.root("store"), s3.storage_options)
    make_job(store.root)
    url = f"{store.job_url(JOB)}/events/duplicate.json"
    store.files.write_once(url, b"{}")
    with pytest.raises(FileExistsError):
        store.files.write_once(url, b"{}")
    assert len(store.read_events(JOB).events) == 4
    with pytest.raises(CorruptStoreError):
        store.files.write_atomic(f"{store.job_url(JOB)}/state.json", b"{")
        store.read_state(JOB)


def test_the_journal_scrubs_secret_values_from_everything_it_records(storage: Path) -> None:
    """A worker's error can quote a credential; nothing the controller records keeps it."""
    from trainctl.events import NodeExited
    from trainctl.recovery.journal import Journal
    from trainctl.secrets import Redactor

    secret = "sk-quoted-by-an-error-123"
    store = make_job(storage)
    record = store.read_state(JOB)
    journal = Journal(store, record, Redactor([secret]))
    record.reason = f"node-0: botocore refused key {secret}"
    record.attempts[0].reason = f"RuntimeError: bad token {secret}"
    journal.save_state()
    journal.event(
        NodeExited(code=1, errors=[f"auth failed for {secret}"]), f"node-0: {secret}", "node-0"
    )
    files = [p for p in (storage / "jobs" / JOB).rglob("*") if p.is_file()]
    assert not [p for p in files if secret in p.read_text(errors="replace")]
    assert "***" in (storage / "jobs" / JOB / "state.json").read_text()
    assert store.read_state(JOB).reason == "node-0: botocore refused key ***"
