"""The Checkpointer in one process (no process group) on file:// and a real S3 endpoint:
commit, skip, fallback, garbage collection, bounded memory, and failing cleanly."""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainctl.checkpoint import inspect
from trainctl.checkpoint.checkpointer import Checkpointer, RestoreError
from trainctl.checkpoint.layout import manifest_key, step_dir_name
from trainctl.checkpoint.storage import MIB, TransferConfig, open_storage

PART = 5 * MIB


class Recorder:
    """An on_event sink."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        self.events.append((name, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


def _state(seed: int, numel: int = 300_000) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(numel, generator=generator),
            "b": torch.randn(17, generator=generator),
        },
        "extra": {"step": seed, "rng": torch.get_rng_state(), "tag": f"s{seed}", "pos": [seed]},
    }


def _empty_state() -> dict[str, Any]:
    state = _state(0)
    state["model"]["w"].zero_()
    state["model"]["b"].zero_()
    state["extra"].update(step=-1, tag="", pos=[])
    return state


def _assert_state_equal(expected: dict[str, Any], got: dict[str, Any]) -> None:
    for name in ("w", "b"):
        assert torch.equal(expected["model"][name], got["model"][name]), name
    assert got["extra"]["step"] == expected["extra"]["step"]
    assert got["extra"]["tag"] == expected["extra"]["tag"]
    assert got["extra"]["pos"] == expected["extra"]["pos"]
    assert torch.equal(got["extra"]["rng"], expected["extra"]["rng"])


def _checkpointer(root: tuple[str, dict[str, Any]], **kwargs: Any) -> Checkpointer:
    url, options = root
    kwargs.setdefault("interval_steps", 10)
    kwargs.setdefault("part_size", PART)
    kwargs.setdefault("concurrency", 2)
    return Checkpointer(url, storage_options=options, **kwargs)


def test_saves_commit_and_restore_the_newest(storage_root: Any) -> None:
    events = Recorder()
    with _checkpointer(storage_root, keep_last=2, on_event=events) as checkpointer:
        assert checkpointer.maybe_save(5, _state(5)) is None  # off the interval
        for step in (10, 20, 30):
            future = checkpointer.maybe_save(step, _state(step), extra={"loss": 0.5})
            assert future is not None
        outcome = checkpointer.wait()
        assert outcome is not None and outcome.committed and outcome.step == 30
        assert outcome.size_bytes > 1_200_000
        restored = _empty_state()
        assert checkpointer.restore_latest(restored) == 30
    _assert_state_equal(_state(30), restored)
    assert events.names().count("checkpoint_committed") == 3
    assert [e["step"] for e in events.of("gc_deleted")] == [10]  # keep_last=2
    steps = inspect.list_steps(storage_root[0], storage_options=storage_root[1])
    assert [(s.step, s.committed, s.world_size) for s in steps] == [(20, True, 1), (30, True, 1)]


def test_plans_cached_across_saves_follow_a_state_that_changes_shape(tmp_path: Path) -> None:
    # Saves reuse DCP's plan while the layout holds; a new tensor, a resized one or a second
    # checkpointer in the same process must never be written with a stale plan.
    root = (str(tmp_path / "a"), {})
    grown = _state(3)
    grown["model"]["new"] = torch.arange(1000.0)
    resized = _state(4, numel=1234)
    with _checkpointer(root) as first, _checkpointer((str(tmp_path / "b"), {})) as second:
        for step, state in ((1, _state(1)), (2, _state(2)), (3, grown), (4, resized)):
            assert first.save(step, state).result().committed
            other = _state(100 + step, numel=999)
            assert second.save(step, other).result().committed
            for checkpointer, expected in ((first, state), (second, other)):
                restored = {
                    "model": {k: torch.zeros_like(v) for k, v in expected["model"].items()},
                    "extra": {
                        "step": -1,
                        "rng": torch.zeros_like(expected["extra"]["rng"]),
                        "tag": "",
                        "pos": [],
                    },
                }
                assert checkpointer.restore_latest(restored) == step
                _assert_state_equal(expected, restored)
                for name, tensor in expected["model"].items():
                    assert torch.equal(restored["model"][name], tensor), name


def test_a_committed_step_is_never_overwritten(storage_root: Any) -> None:
    events = Recorder()
    with _checkpointer(storage_root, on_event=events) as checkpointer:
        assert checkpointer.save(10, _state(10)).result().committed
        assert checkpointer.save(10, _state(11)).result().status == "skipped"
    # a new process (no memory of the commit) must refuse too: the manifest says so
    with _checkpointer(storage_root, on_event=events) as checkpointer:
        outcome = checkpointer.save(10, _state(12)).result()
        assert outcome.status == "skipped" and "already committed" in outcome.reason
        restored = _empty_state()
        assert checkpointer.restore_latest(restored) == 10
    _assert_state_equal(_state(10), restored)
    assert events.names().count("checkpoint_skipped") == 2
    # A save that writes before the ranks agree (its plan is cached: a step committed just
    # before) must not publish a byte into a committed step it then finds: here step 20,
    # committed by an earlier attempt above the step this one went on from.
    with _checkpointer(storage_root, on_event=events) as checkpointer:
        assert checkpointer.save(20, _state(20)).result().committed
    storage = open_storage(storage_root[0], storage_options=storage_root[1])
    before = {
        key: bytes(storage.read(key)) for key in storage.list_objects(f"{step_dir_name(20)}/")
    }
    with _checkpointer(storage_root, on_event=events) as checkpointer:
        assert checkpointer.save(15, _state(15)).result().committed
        outcome = checkpointer.save(20, _state(21)).result()
        assert outcome.status == "skipped" and "already committed" in outcome.reason
    after = {key: bytes(storage.read(key)) for key in storage.list_objects(f"{step_dir_name(20)}/")}
    assert after == before
    storage.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "drop_manifest"])
def test_restore_falls_back_past_a_damaged_step(storage_root: Any, damage: str) -> None:
    events = Recorder()
    with _checkpointer(storage_root, on_event=events) as checkpointer:
        checkpointer.save(10, _state(10))
        checkpointer.save(20, _state(20)).result()
    storage = open_storage(storage_root[0], storage_options=storage_root[1])
    shard = f"{step_dir_name(20)}/__0_0.distcp"
    data = bytearray(storage.read(shard))
    if damage == "corrupt":
        data[len(data) // 3] ^= 0x40
        storage.put(shard, bytes(data))
    elif damage == "truncate":
        storage.put(shard, bytes(data[:-100]))
    else:
        storage.delete(manifest_key(20))

    if damage != "drop_manifest":
        verdict = inspect.verify(storage_root[0], 20, storage_options=storage_root[1])
        assert not verdict.ok and [p.path for p in verdict.problems] == ["__0_0.distcp"]
        assert inspect.verify(storage_root[0], 10, storage_options=storage_root[1]).ok

    with _checkpointer(storage_root, on_event=events) as checkpointer:
        restored = _empty_state()
        assert checkpointer.restore_latest(restored) == 10
    _assert_state_equal(_state(10), restored)
    skipped = events.of("restore_skipped")
    assert [s["step"] for s in skipped] == [20]
    expected_reason = {
        "corrupt": "checksum mismatch",
        "truncate": "differs from the recorded",
        "drop_manifest": "no manifest",
    }[damage]
    assert expected_reason in skipped[0]["reason"]
    storage.close()


def test_restore_refuses_to_continue_when_every_step_is_bad(tmp_path: Path) -> None:
    root = (str(tmp_path / "ckpt"), {})
    with _checkpointer(root) as checkpointer:
        checkpointer.save(10, _state(10)).result()
    shard = tmp_path / "ckpt" / step_dir_name(10) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    with _checkpointer(root) as checkpointer, pytest.raises(RestoreError):
        checkpointer.restore_latest(_empty_state())
    with _checkpointer((str(tmp_path / "empty"), {})) as checkpointer:
        assert checkpointer.restore_latest(_empty_state()) is None


def test_a_save_killed_mid_upload_is_ignored_then_collected(
    storage_root: Any, request: Any
) -> None:
    url, options = storage_root
    with _checkpointer(storage_root, keep_last=2) as checkpointer:
        checkpointer.save(10, _state(10)).result()
    # What a rank killed mid-upload of step 20 leaves behind: a shard, no manifest, and on S3
    # an open multipart upload.
    storage = open_storage(url, storage_options=options, config=TransferConfig(part_size=PART))
    storage.put(f"{step_dir_name(20)}/__0_0.distcp", os.urandom(1000))
    if url.startswith("s3://"):
        endpoint = request.getfixturevalue("s3")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        endpoint.client().create_multipart_upload(
            Bucket=bucket, Key=f"{prefix}/{step_dir_name(20)}/__1_0.distcp"
        )
    events = Recorder()
    with _checkpointer(storage_root, keep_last=2, on_event=events) as checkpointer:
        restored = _empty_state()
        assert checkpointer.restore_latest(restored) == 10
        assert events.of("restore_skipped")[0]["step"] == 20
        # the job goes on and commits later steps; GC then removes the leftover
        checkpointer.save(30, _state(30)).result()
    deleted = {(e["kind"], e["step"]) for e in events.of("gc_deleted")}
    assert ("step", 20) in deleted
    if url.startswith("s3://"):
        assert ("upload", 20) in deleted
        assert storage.list_uploads() == []
    assert [s.step for s in inspect.list_steps(url, storage_options=options)] == [10, 30]
    storage.close()


def test_gc_on_demand_with_dry_run(storage_root: Any) -> None:
    url, options = storage_root
    with _checkpointer(storage_root, keep_last=5) as checkpointer:
        for step in (10, 20, 30, 40):
            checkpointer.save(step, _state(step, numel=1000))
        checkpointer.wait()
    planned = inspect.gc(url, keep_last=2, keep_every=20, dry_run=True, storage_options=options)
    assert [(a.step, a.kind) for a in planned] == [(10, "step")]
    assert "older than the newest 2" in planned[0].reason
    assert len(inspect.list_steps(url, storage_options=options)) == 4
    done = inspect.gc(url, keep_last=2, keep_every=20, dry_run=False, storage_options=options)
    assert done == planned
    assert [s.step for s in inspect.list_steps(url, storage_options=options)] == [20, 30, 40]


def test_staging_buffers_are_reused_and_memory_stays_flat(storage_root: Any) -> None:
    state = _state(1, numel=500_000)  # 2 MB
    with _checkpointer(storage_root, interval_steps=1, keep_last=2) as checkpointer:
        checkpointer.save(1, state).result()
        first_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for step in range(2, 22):
            state["model"]["w"].add_(1.0)
            state["extra"]["step"] = step
            checkpointer.save(step, state)
        outcome = checkpointer.wait()
        assert outcome is not None and outcome.committed
        assert checkpointer._stager.num_allocations == 1
        assert checkpointer.staging_bytes == state["model"]["w"].nbytes + 17 * 4 + (
            state["extra"]["rng"].nbytes
        )
        storage = checkpointer.storage
        if hasattr(storage, "buffers"):
            assert storage.buffers.allocated_bytes <= PART * 2
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - first_rss
        restored = _empty_state()
        restored["model"]["w"] = torch.zeros(500_000)
        assert checkpointer.restore_latest(restored) == 21
    assert torch.equal(restored["model"]["w"], state["model"]["w"])
    # 20 more saves of a 2 MB state: the peak grows by far less than 20 copies would need
    assert grown_kib < 20 * 2 * 1024 / 2


def test_training_survives_an_unreachable_endpoint(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    events = Recorder()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
    with Checkpointer(
        "s3://nowhere/ckpt",
        interval_steps=1,
        storage_options=options,
        part_size=PART,
        max_attempts=2,
        on_event=events,
    ) as checkpointer:
        outcome = checkpointer.save(1, _state(1, numel=100)).result()
    assert outcome.status == "failed"
    assert events.names() == ["checkpoint_failed"]


def test_endpoint_outage_during_upload_fails_that_save_only(s3: Any) -> None:
    """The S3 endpoint stops while a save uploads and comes back: that save fails with an
    event, training is never interrupted, the next save commits, restore never sees the
    partial step."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    root = f"s3://{s3.bucket}/outage"  # moto's state is per process: the bucket is shared
    events = Recorder()
    try:
        with Checkpointer(
            root,
            interval_steps=1,
            storage_options=options,
            part_size=PART,
            concurrency=1,
            max_attempts=2,
            on_event=events,
        ) as checkpointer:
            assert checkpointer.save(1, _state(1, numel=3_000_000)).result().committed
            pending = checkpointer.save(2, _state(2, numel=3_000_000))  # 12 MB: 3 parts
            server.stop()
            assert pending.result().status == "failed"
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            time.sleep(0.2)
            assert checkpointer.save(3, _state(3, numel=3_000_000)).result().committed
            restored = _empty_state()
            restored["model"]["w"] = torch.zeros(3_000_000)
            assert checkpointer.restore_latest(restored) == 3
        assert events.names()[:3] == [
            "checkpoint_committed",
            "checkpoint_failed",
            "checkpoint_committed",
        ]
        _assert_state_equal(_state(3, numel=3_000_000), restored)
    finally:
        server.stop()


def test_early_metadata_is_kept_when_right_and_rewritten_when_the_layout_moves(
    tmp_path: Path,
) -> None:
    # `.metadata` is written while the shards are, from the previous save's layout. A plain
    # value that grows moves the offsets of what follows it: the early file must then be
    # replaced, or plain DCP would read the wrong bytes.
    root = (str(tmp_path), {})
    saved = {}
    with _checkpointer(root, interval_steps=1, keep_last=10) as checkpointer:
        for step in (1, 2, 3, 4):
            state = _state(step)
            state["extra"]["tag"] = "x" if step < 3 else "x" * 5000
            saved[step] = state
            assert checkpointer.save(step, state).result().committed
        assert checkpointer._early_metadata.hits == 2  # steps 2 and 4; step 3 was rewritten
    for step, state in saved.items():
        restored = _empty_state()
        dcp.load(restored, checkpoint_id=str(tmp_path / step_dir_name(step)))
        _assert_state_equal(state, restored)


def test_a_failed_saves_leftover_is_cleared_before_the_step_is_saved_again(
    tmp_path: Path,
) -> None:
    # Saves after the first write before every rank agreed, and publish only after: a
    # leftover of an earlier failed save of the same step (published objects, no manifest)
    # must still be cleared first; a file some crashed writer never renamed is not one.
    root = (str(tmp_path), {})
    with _checkpointer(root, interval_steps=1, keep_last=10) as checkpointer:
        assert checkpointer.save(1, _state(1)).result().committed
        leftover = tmp_path / step_dir_name(2)
        leftover.mkdir()
        (leftover / "__0_0.distcp").write_bytes(b"junk from a failed save")
        (leftover / "__7_0.distcp").write_bytes(b"a shard of a larger world")
        assert checkpointer.save(2, _state(2)).result().committed
        assert not (leftover / "__7_0.distcp").exists()
        stale = tmp_path / step_dir_name(3)
        stale.mkdir()
        (stale / "__0_0.distcp.tmp-1-deadbeef").write_bytes(b"never renamed")
        assert checkpointer.save(3, _state(3)).result().committed
    for step in (2, 3):
        restored = _empty_state()
        dcp.load(restored, checkpoint_id=str(tmp_path / step_dir_name(step)))
        _assert_state_equal(_state(step), restored)
