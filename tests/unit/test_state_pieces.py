"""The job record in pieces (state.json v3): what is written for each change, and the whole
record read back, from a local root and from S3, from this layout or the whole-record one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Endpoint
from trainctl.errors import CorruptStoreError, StorageError
from trainctl.recovery.journal import Journal
from trainctl.recovery.placement import Exclusion, NodeSelection
from trainctl.state import AttemptState, JobRecord, JobState, NodeRecord, NodeState
from trainctl.state_pieces import NODES_PER_SHARD
from trainctl.store import JobStore

JOB = "pieces"
NUM_NODES = 2 * NODES_PER_SHARD + 5
"""Three shards, the last one partial."""


def new_job(store: JobStore) -> JobRecord:
    record = JobRecord(JOB, "pieces", created_at=1.0, updated_at=1.0)
    record.nodes = [NodeRecord(f"node-{i}") for i in range(NUM_NODES)]
    record.nodes[-1].state = NodeState.SPARE
    store.create(record, "name: pieces\nscript: /x.py\n")
    return record


def start(journal: Journal, nodes: int = NUM_NODES - 1) -> None:
    names = tuple(f"node-{i}" for i in range(nodes))
    journal.start_attempt(NodeSelection(names), nodes, "127.0.0.1:1", [], None)


def end(journal: Journal) -> None:
    journal.end_attempt(
        AttemptState.FAILED,
        "node-3 lost",
        exit_code=None,
        cause="node_fault",
        blamed="node-3",
        failed_at=None,
        decided_at=time.time(),
    )


def comparable(record: JobRecord) -> dict[str, Any]:
    data = record.to_json()
    del data["updated_at"]
    return data


def written_by(job_dir: Path, change: Any) -> set[str]:
    """The record's files (state.json and its pieces) that `change` wrote: every file is
    stamped mtime 0 first, so a file replaced or created by `change` is one without it."""
    files = [p for p in job_dir.rglob("*") if p.is_file()]
    for path in files:
        os.utime(path, ns=(0, 0))
    change()
    found = {
        str(p.relative_to(job_dir))
        for p in job_dir.rglob("*")
        if p.is_file() and p.stat().st_mtime_ns != 0
    }
    return {f for f in found if f == "state.json" or f.split("/")[0] in ("node-shards", "attempts")}


def test_a_record_written_in_pieces_reads_back_whole(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path))
    record = new_job(store)
    journal = Journal(store, record)
    start(journal)
    record.node("node-3").pid, record.node("node-3").step = 4242, 17
    end(journal)
    start(journal, nodes=3)
    back = store.read_state(JOB)
    assert comparable(back) == comparable(record)
    assert [n.name for n in back.nodes] == [f"node-{i}" for i in range(NUM_NODES)]
    assert back.attempts[1].nodes == ["node-0", "node-1", "node-2"]
    assert back.node("node-3").pid == 4242
    job = tmp_path / "jobs" / JOB
    state = json.loads((job / "state.json").read_text())
    assert "nodes" not in state and "attempts" not in state
    assert (state["version"], state["num_node_shards"], state["num_attempts"]) == (3, 3, 2)


def test_the_journal_writes_only_what_changed(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path))
    record = new_job(store)
    journal = Journal(store, record)
    job = tmp_path / "jobs" / JOB
    assert written_by(job, journal.save_state) == {
        "state.json",
        "node-shards/0.json",
        "node-shards/1.json",
        "node-shards/2.json",
    }  # a journal's first write is whole: it does not know what is stored
    assert written_by(job, lambda: start(journal)) == {
        "state.json",
        "node-shards/0.json",
        "node-shards/1.json",
        "node-shards/2.json",
        "attempts/0.json",
        "attempts/0.nodes.json",
    }

    def progress() -> None:  # every node's step moves: no node shard is rewritten
        for node in record.nodes:
            node.step = (node.step or 0) + 1
        record.step = record.attempts[-1].last_step = 1
        journal.save_state()

    assert written_by(job, progress) == {"state.json", "attempts/0.json"}

    def lost() -> None:
        record.node(f"node-{NODES_PER_SHARD + 1}").move(NodeState.FAILED, "connection reset")
        journal.save_state()

    assert written_by(job, lost) == {"state.json", "node-shards/1.json"}
    now = time.time()
    exclusion = Exclusion("node-3", "lost", "node_fault", now, now + 60)
    assert written_by(job, lambda: journal.exclude(exclusion) or journal.save_state()) == {
        "state.json",
        "node-shards/0.json",
    }
    assert written_by(job, lambda: end(journal)) == {"state.json", "attempts/0.json"}
    written = written_by(job, lambda: start(journal, nodes=2))
    assert not {"attempts/0.json", "attempts/0.nodes.json"} & written  # finished: never again
    assert {"attempts/1.json", "attempts/1.nodes.json"} <= written
    # The stored step of a node is as of its last record write; the record read back is whole.
    assert store.read_state(JOB).node(f"node-{NODES_PER_SHARD + 1}").step == 1


def test_a_whole_record_state_json_of_version_2_still_reads(tmp_path: Path) -> None:
    record = JobRecord(JOB, "old", created_at=1.0, updated_at=2.0, state=JobState.RUNNING)
    record.nodes = [NodeRecord("node-0", NodeState.RUNNING, pid=7, step=3)]
    whole = {**record.to_json(), "version": 2}
    (tmp_path / "jobs" / JOB).mkdir(parents=True)
    (tmp_path / "jobs" / JOB / "state.json").write_text(json.dumps(whole))
    back = JobStore(str(tmp_path)).read_state(JOB)
    assert back.node("node-0").pid == 7 and back.node("node-0").step == 3
    assert back.state == JobState.RUNNING


@pytest.mark.parametrize(
    ("piece", "content", "says"),
    [
        ("node-shards/1.json", None, "missing"),
        ("node-shards/2.json", '{"nodes": [{"name": "node-9", "state": "dancing"}]}', "state"),
        ("attempts/0.json", "{", "not JSON"),
        ("attempts/0.nodes.json", '{"nodes": 3}', "expected"),
    ],
)
def test_a_missing_or_bad_piece_is_named(
    tmp_path: Path, piece: str, content: str | None, says: str
) -> None:
    store = JobStore(str(tmp_path))
    journal = Journal(store, new_job(store))
    start(journal)
    path = tmp_path / "jobs" / JOB / piece
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(CorruptStoreError) as raised:
        store.read_state(JOB)
    assert raised.value.where == str(path) and says in raised.value.problem


def test_pieces_on_s3_are_written_and_read_back_whole(s3: S3Endpoint) -> None:
    store = JobStore(s3.root("store"), s3.storage_options)
    record = new_job(store)
    journal = Journal(store, record)
    start(journal)
    record.node("node-3").move(NodeState.RUNNING)
    journal.save_state()
    assert comparable(store.read_state(JOB)) == comparable(record)
    keys = {
        o["Key"].split(f"jobs/{JOB}/", 1)[1]
        for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="store/")["Contents"]
    }
    assert {"state.json", "node-shards/2.json", "attempts/0.nodes.json"} <= keys
    s3.client().delete_object(Bucket=s3.bucket, Key=f"store/jobs/{JOB}/attempts/0.json")
    with pytest.raises(CorruptStoreError, match=r"attempts/0\.json"):
        store.read_state(JOB)


def test_a_piece_that_failed_to_write_is_written_next_time(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path))
    record = new_job(store)
    writer = store.state_writer(JOB)
    writer.write(record)
    blocker = tmp_path / "jobs" / JOB / "attempts"
    blocker.write_text("not a directory")  # the store refuses the attempt's pieces
    journal = Journal(store, record)
    with pytest.raises(StorageError):
        start(journal)
    with pytest.raises(StorageError):
        writer.write(record)
    blocker.unlink()
    written = writer.write(record)
    assert written.files == 1 + 2 + 3  # state.json, the attempt and its list, every shard
    assert comparable(store.read_state(JOB)) == comparable(record)
