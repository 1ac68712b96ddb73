"""The slot reader's reads (`trainctl.checkpoint.slot_fetch`), one process, real slot files in
tmpfs written by the worker's `SlotWriter`, a real `PeerServer` on 127.0.0.1 for the peer
case: a stored chunk that maps whole lands straight in the destination and is summed there; a
resharded one goes through the staging buffer (reused, bounded); a copy corrupted after its
sums were recorded fails after the direct read, leaving the state dirty, and the durable
restore that follows overwrites all of it (the fingerprint of the durable step). Spans are a
pure function: a table."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from tests.checkpoint.test_ckpt_memory import Recorder
from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import restore_tiers
from trainctl.checkpoint.peer_wire import PeerServer, read_token
from trainctl.checkpoint.slot_fetch import (
    Need,
    SlotChecksumError,
    Span,
    Staging,
    plan_spans,
    read_copy,
)
from trainctl.checkpoint.slot_layout import RankCopy, RestoreIndex, Source
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slot_reader import SlotReader, SlotRestorer
from trainctl.checkpoint.slots import SlotError, SlotWriter, flatten
from trainctl.runtime.fingerprint import fingerprint_state

SHM = "/dev/shm"
TOKEN = "job-token"


@pytest.mark.parametrize(
    ("needs", "limit", "max_gap", "spans"),
    [
        ([], 100, 10, []),
        # Direct entries take no staging: one span however big.
        (
            [Need(0, 0, 500, True), Need(1, 512, 500, True)],
            100,
            64,
            [Span(0, 1012, (Need(0, 0, 500, True), Need(1, 512, 500, True)), (), 0)],
        ),
        # Staged entries pack at 64-byte alignment; the third would pass the limit.
        (
            [Need(2, 128, 60, False), Need(0, 0, 10, False), Need(1, 64, 10, False)],
            128,
            64,
            [
                Span(
                    0, 74, (Need(0, 0, 10, False), Need(1, 64, 10, False)), ((0, 0), (1, 64)), 128
                ),
                Span(128, 188, (Need(2, 128, 60, False),), ((2, 0),), 64),
            ],
        ),
        # A gap over max_gap starts a new get; a staged entry over the limit is alone.
        (
            [Need(0, 0, 8, True), Need(1, 1000, 300, False), Need(2, 1300, 8, True)],
            100,
            64,
            [
                Span(0, 8, (Need(0, 0, 8, True),), (), 0),
                Span(
                    1000, 1308, (Need(1, 1000, 300, False), Need(2, 1300, 8, True)), ((1, 0),), 320
                ),
            ],
        ),
    ],
)
def test_plan_spans(needs: list[Need], limit: int, max_gap: int, spans: list[Span]) -> None:
    assert plan_spans(needs, limit, max_gap) == spans


def _state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 48, generator=generator),
        "b": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "t": torch.randn(48, 64, generator=generator).t(),  # a non-contiguous destination
        "extra": {"lr": 0.1 * seed, "name": "adamw"},
    }


def _blank() -> dict[str, Any]:
    blank = {name: torch.zeros_like(value) for name, value in _state(0).items() if name != "extra"}
    blank["t"] = torch.zeros(48, 64).t()
    return {**blank, "extra": {"lr": -1.0, "name": ""}}


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Step 2 in rank 0's slot (its sums taken, as the holder does, before any corruption),
    step 1 in durable storage, and a holder's server over the node directory."""
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    root = os.path.join(SHM, f"trainctl-test-fetch-{os.getpid()}-{tmp_path.name}")
    writer = SlotWriter(root, rank=0, world_size=1, attempt=0)
    server = PeerServer(root, TOKEN, "127.0.0.1").start()
    try:
        writer.save(2, flatten(_state(2)))
        index = local_restore_index(root)
        assert isinstance(index, RestoreIndex) and index.step == 2
        durable = f"file://{tmp_path}/durable"
        with Checkpointer(durable, interval_steps=1, on_event=Recorder()) as checkpointer:
            checkpointer.save(1, _state(1))
            checkpointer.wait()
        yield {"root": root, "index": index, "server": server, "durable": durable}
    finally:
        server.close()
        writer.close()
        shutil.rmtree(root, ignore_errors=True)


def _index(node: dict[str, Any], where: str) -> RestoreIndex:
    """The node's index, its copy read in place (``local``) or from the holder (``peer``)."""
    index: RestoreIndex = node["index"]
    if where == "local":
        return index
    copy = index.ranks[0]
    assert copy.source.path is not None
    source = Source(
        endpoint=node["server"].endpoint,
        relative=os.path.relpath(copy.source.path, node["root"]),
        kind="replica",
    )
    return RestoreIndex(index.step, "peer", (RankCopy(copy.layout, source, copy.crcs),))


def _load(index: RestoreIndex, state: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SlotReader(index, read_token(TOKEN)), no_dist=True)


def _entry(index: RestoreIndex, fqn: str) -> dict[str, Any]:
    return next(e for e in index.ranks[0].layout.entries if e.get("fqn") == fqn)


def _flip(index: RestoreIndex, fqn: str) -> None:
    entry = _entry(index, fqn)
    path = index.ranks[0].source.path
    assert path is not None
    with open(path, "r+b") as file:
        file.seek(entry["offset"] + 8)
        data = file.read(4)
        file.seek(entry["offset"] + 8)
        file.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("where", ["local", "peer"])
def test_whole_chunks_and_staged_ones_load_bit_identically(
    node: dict[str, Any], where: str
) -> None:
    state = _blank()
    _load(_index(node, where), state)
    expected = _state(2)
    for name in ("w", "b", "t"):
        assert torch.equal(state[name], expected[name]), name
    assert state["extra"] == expected["extra"]


@pytest.mark.parametrize("where", ["local", "peer"])
def test_a_corrupt_whole_chunk_lands_dirty_fails_and_durable_overwrites_everything(
    node: dict[str, Any], where: str
) -> None:
    index = _index(node, where)
    _flip(node["index"], "w")  # after the sums were taken: the copy went bad in memory
    state = _blank()
    with pytest.raises(CheckpointException) as raised:
        _load(index, state)
    failure = raised.value.failures[0]
    error = failure[0] if isinstance(failure, tuple) else failure
    assert isinstance(error, SlotChecksumError) and "entry 0 (w) fails its checksum" in str(error)
    # The bytes were received in place (no staging), so the state is dirty now ...
    assert state["w"].count_nonzero() > 0
    assert not torch.equal(state["w"], _state(2)["w"])
    # ... and the restore falls back to durable storage, which overwrites all of it.
    events = Recorder()
    restorer = SlotRestorer(lambda: index, None, events, token=read_token(TOKEN))
    with Checkpointer(node["durable"], interval_steps=1, on_event=events) as checkpointer:
        assert restore_tiers(restorer, checkpointer, state, events) == 1
    assert fingerprint_state(_tensors(state)) == fingerprint_state(_tensors(_state(1)))
    assert state["extra"] == _state(1)["extra"]
    skipped = events.of("restore_skipped")
    assert skipped and "checksum" in skipped[0]["reason"], skipped
    assert events.of("checkpoint_restored")[-1]["tier"] == "durable"


@pytest.mark.parametrize("where", ["local", "peer"])
def test_a_resharded_chunk_is_read_through_staging_and_checked(
    node: dict[str, Any], where: str
) -> None:
    """This rank holds rows 5..20 of the stored (64, 48) chunk of ``w``, as after a reshard."""
    index = _index(node, where)
    reader = SlotReader(index, read_token(TOKEN))
    dest = torch.zeros(15, 48)
    planner = DefaultLoadPlanner()
    planner.set_up_planner({"w": dest}, reader.read_metadata(), True)
    item = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w", (0, 0)),
        dest_offsets=torch.Size((0, 0)),
        storage_index=MetadataIndex("w", (0, 0)),
        storage_offsets=torch.Size((5, 0)),
        lengths=torch.Size((15, 48)),
    )
    reader.read_data(LoadPlan([item]), planner).wait()
    assert torch.equal(dest, _state(2)["w"][5:20])
    # Corrupt, the staged entry fails before a byte of it reaches the destination.
    _flip(node["index"], "w")
    dest.zero_()
    with pytest.raises(SlotChecksumError, match="checksum"):
        reader.read_data(LoadPlan([item]), planner).wait()
    assert dest.count_nonzero() == 0


@pytest.mark.parametrize("where", ["local", "peer"])
def test_staging_is_one_buffer_reused_and_bounded_across_spans(
    node: dict[str, Any], where: str
) -> None:
    """`read_copy` with ``w`` direct and every other entry staged through a buffer of at most
    `limit` bytes (locally too, as for GPU destinations, where the buffer is pinned)."""
    index = _index(node, where)
    copy = index.ranks[0]
    entries = copy.layout.entries
    w = next(i for i, e in enumerate(entries) if e.get("fqn") == "w")
    needs = [Need(i, int(e["offset"]), int(e["nbytes"]), i == w) for i, e in enumerate(entries)]
    limit = max(int(e["nbytes"]) for i, e in enumerate(entries) if i != w) + 64
    target = torch.zeros(64, 48)
    seen: dict[int, bytes] = {}
    staging = Staging(stage_local=True)
    read_copy(
        copy,
        read_token(TOKEN),
        needs,
        {w: memoryview(target.view(torch.uint8).numpy()).cast("B")},
        staging,
        lambda i, data: seen.__setitem__(i, data.numpy().tobytes()),
        limit=limit,
    )
    assert len(plan_spans(needs, limit)) > 1 and 0 < staging.nbytes <= limit
    assert torch.equal(target, _state(2)["w"]) and w not in seen
    path = node["index"].ranks[0].source.path
    with open(path, "rb") as file:
        for i, entry in enumerate(entries):
            if i != w:
                file.seek(entry["offset"])
                assert seen[i] == file.read(entry["nbytes"]), i
    if where == "peer":  # the index holds no token: without one, nothing is read
        with pytest.raises(SlotError, match="token"):
            read_copy(copy, "", needs[w + 1 :], {}, Staging(), lambda i, data: None)


def test_the_index_is_versioned_and_an_old_one_with_a_token_still_reads(
    node: dict[str, Any],
) -> None:
    index: RestoreIndex = _index(node, "peer")
    written = index.to_json()
    assert written["version"] == 2 and "token" not in written["ranks"][0]["source"]
    assert RestoreIndex.from_json(written) == index
    old = {**written, "ranks": [dict(r) for r in written["ranks"]]}
    del old["version"]  # version 1: the holders' token beside each remote source
    old["ranks"][0]["source"] = {**old["ranks"][0]["source"], "token": TOKEN}
    assert RestoreIndex.from_json(old) == index
    # A newer format than this reader knows: refused, and the restore says why (no crash).
    newer = {**written, "version": 3}
    with pytest.raises(ValueError, match="version 3"):
        RestoreIndex.from_json(newer)
    restorer = SlotRestorer(lambda: RestoreIndex.from_json(newer), None, Recorder())
    assert restorer.newest_listed_step() is None
    assert "version 3" in restorer.missing_reason
