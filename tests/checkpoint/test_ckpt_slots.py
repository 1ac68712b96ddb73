"""The memory tier's slots: the layout DCP's planner gives, the per-step copy and record, the
index built from a node's own slot records, and restores through the slot reader.

One spawn of 2 gloo ranks (FSDP2 model + AdamW with a changing learning rate) saves 4 steps
into its slots and restores them as a restarted attempt would (a). The single-process tests then
work on a copy of that node directory: a reshard 2 -> 1 with one rank's copy read from a real
`PeerServer` on 127.0.0.1 (b), a corrupted entry falling back to durable storage with the
checksum named (c), a torn slot (record missing) never used (d). Run under the e2e lock: the
spawn starts processes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dist_workers as workers
import pytest
import slot_workers
import torch

from tests.checkpoint.test_ckpt_memory import Recorder
from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import restore_tiers
from trainctl.checkpoint.peer_wire import PeerServer, read_token
from trainctl.checkpoint.slot_catalog import checksums_json
from trainctl.checkpoint.slot_layout import (
    SLOTS_DIR,
    Layout,
    RestoreIndex,
    SlotRecord,
    Source,
    checksums_name,
    layout_name,
    read_json,
    record_name,
    write_json_atomic,
)
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slot_reader import SlotRestorer, agree_on_step
from trainctl.checkpoint.slots import (
    ALIGN,
    OBJECTS,
    SlotWriter,
    entry_crcs,
    flatten,
    plan_layout,
)
from trainctl.env import Env
from trainctl.runtime.checkpoint import ModelAndOptimizer, TrainerState
from trainctl.secrets import write_private

pytestmark = pytest.mark.timeout(300)
SHM = "/dev/shm"
STEPS = 4


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[str]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    path = os.path.join(SHM, f"trainctl-test-slots-{os.getpid()}-{tmp_path.name}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------ one process, pure


def _state(seed: int, lr: float = 0.5) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 7, generator=generator),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(seed),
        "empty": torch.empty(0, 3),
        "extra": {"lr": lr, "betas": (0.9, 0.99), "name": "adamw"},
    }


def test_the_layout_has_one_aligned_entry_per_chunk_and_one_for_the_values() -> None:
    flat = flatten(_state(1))
    layout = plan_layout(flat, rank=1, world_size=2, attempt=3)
    tensors = [e for e in layout.entries if e["kind"] != OBJECTS]
    assert {e["fqn"] for e in tensors} == {"w", "half", "scalar", "empty"}
    by_fqn = {e["fqn"]: e for e in tensors}
    assert by_fqn["w"]["nbytes"] == 33 * 7 * 4 and by_fqn["w"]["global_size"] == [33, 7]
    assert by_fqn["w"]["chunk_offsets"] == [0, 0] and by_fqn["w"]["chunk_sizes"] == [33, 7]
    assert by_fqn["half"]["dtype"] == "bfloat16" and by_fqn["half"]["nbytes"] == 10
    assert by_fqn["empty"]["nbytes"] == 0
    objects = layout.entries[-1]
    assert objects["kind"] == OBJECTS
    assert sorted(objects["fqns"]) == ["extra.betas", "extra.lr", "extra.name"]
    end = 0
    for entry in layout.entries:
        assert entry["offset"] % ALIGN == 0 and entry["offset"] >= end
        end = entry["offset"] + entry["nbytes"]
    assert layout.nbytes == end and layout.nbytes % ALIGN == 0
    assert (layout.rank, layout.world_size, layout.attempt) == (1, 2, 3)
    assert Layout.from_json(layout.to_json()).digest == layout.digest
    assert plan_layout(flat, 1, 2, 4).digest != layout.digest  # the attempt is part of it


def test_saves_alternate_slots_and_a_new_shape_lays_out_again(shm_dir: str) -> None:
    writer = SlotWriter(shm_dir, rank=0, world_size=1, attempt=0)
    slots = os.path.join(shm_dir, SLOTS_DIR)
    assert [writer.save(step, flatten(_state(step))) for step in (1, 2, 3)] == [0, 1, 0]
    layout = Layout.from_json(read_json(os.path.join(slots, layout_name(0))))
    records = [
        SlotRecord.from_json(read_json(os.path.join(slots, record_name(0, k)))) for k in (0, 1)
    ]
    assert records == [SlotRecord(3, 0, layout.digest), SlotRecord(2, 0, layout.digest)]
    assert os.path.getsize(os.path.join(slots, "rank-00000.slot-0")) == layout.nbytes
    # A learning rate that changes keeps the layout; a tensor of a new shape lays out again,
    # and the records of the old layout go (they describe bytes laid out differently).
    writer.save(4, flatten(_state(4, lr=0.25)))
    assert writer.layout is not None and writer.layout.digest == layout.digest
    grown = _state(5)
    grown["w"] = torch.zeros(40, 7)
    writer.save(5, flatten(grown))
    assert writer.layout is not None and writer.layout.digest != layout.digest
    assert read_json(os.path.join(slots, layout_name(0)))["nbytes"] == writer.layout.nbytes
    kept = [read_json(os.path.join(slots, record_name(0, k))) for k in (0, 1)]
    assert [SlotRecord.from_json(r) for r in kept if r] == [SlotRecord(5, 0, writer.layout.digest)]
    writer.close()


def test_index_from_local_slots_takes_the_newest_step_every_rank_has(shm_dir: str) -> None:
    writers = [SlotWriter(shm_dir, rank, world_size=2, attempt=0) for rank in (0, 1)]
    for step in (1, 2, 3):
        for writer in writers:
            if (writer.rank, step) != (1, 3):  # rank 1 died before its step 3 was written
                writer.save(step, flatten(_state(10 * step + writer.rank)))
    index = local_restore_index(shm_dir)
    assert isinstance(index, RestoreIndex), index
    assert index.step == 2 and index.tier == "memory"
    assert [copy.layout.rank for copy in index.ranks] == [0, 1]
    for copy in index.ranks:
        assert copy.source.path is not None and copy.source.kind == "own"
        with open(copy.source.path, "rb") as file:
            assert copy.crcs == entry_crcs(file.read(), copy.layout)
    # No common step: rank 1's step-2 record torn away.
    slot = 1  # step 2 of rank 1 went to its slot 1 (steps 1, 2 only)
    os.unlink(os.path.join(shm_dir, SLOTS_DIR, record_name(1, slot)))
    assert "no step" in str(local_restore_index(shm_dir))
    os.unlink(os.path.join(shm_dir, SLOTS_DIR, layout_name(1)))
    assert "ranks [1]" in str(local_restore_index(shm_dir))
    for writer in writers:
        writer.close()


@pytest.mark.parametrize(
    ("views", "agreed"),
    [
        ([(12, ""), (12, "")], 12),
        ([(12, "")], 12),
        ([(12, ""), (None, "no index")], "rank 1: no index"),
        ([(None, "a"), (None, "b")], "rank 0: a; rank 1: b"),
        ([(12, ""), (11, "")], "different steps [11, 12]"),
        ([(None, "x")] * 6, "and 2 more"),
        ([], "no rank"),
    ],
)
def test_ranks_restore_from_memory_only_when_every_index_names_one_step(
    views: list[tuple[int | None, str]], agreed: int | str
) -> None:
    got = agree_on_step(views)
    if isinstance(agreed, int):
        assert got == agreed
    else:
        assert isinstance(got, str) and agreed in got, got


# -------------------------------------------------------------------- two ranks, then copies


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two FSDP2 ranks save steps 1-4 into a node's slots (durable storage: step 2), then
    restore them in a restarted attempt; a copy of the node directory after step 4."""
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    base = tmp_path_factory.mktemp("slots")
    shm = os.path.join(SHM, f"trainctl-test-slots-{os.getpid()}-{base.name}")
    node_root, snapshot = os.path.join(shm, "node-0"), os.path.join(shm, "snapshot")
    durable = f"file://{base}/durable"
    out = base / "out.pt"
    try:
        workers.run(
            2,
            slot_workers.save_then_restore,
            (node_root, snapshot, durable, str(out), STEPS),
            str(base),
        )
        yield {
            "node_root": node_root,
            "snapshot": snapshot,
            "durable": durable,
            "shm": shm,
            **torch.load(out, weights_only=False),
        }
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_two_ranks_restore_their_own_slots_bit_identically(saved: dict[str, Any]) -> None:
    assert saved["restored"] == STEPS
    _assert_same(saved["prints"][STEPS], saved["got"])
    restored = [f for name, f in saved["events"] if name == "checkpoint_restored"]
    assert restored[-1]["tier"] == "memory" and restored[-1]["step"] == STEPS
    assert restored[-1]["saved_world_size"] == 2
    # Steps 1-4 went to slots 0, 1, 0, 1: the restarted attempt's first save took slot 0 (the
    # older step), never slot 1, the one restored from.
    assert saved["next_slot"] == 1
    slots = os.path.join(saved["node_root"], SLOTS_DIR)
    record = SlotRecord.from_json(read_json(os.path.join(slots, record_name(0, 0))))
    assert record is not None and (record.step, record.attempt) == (STEPS + 1, 1)


def _copy(saved: dict[str, Any], shm_dir: str, name: str) -> str:
    target = os.path.join(shm_dir, name)
    shutil.copytree(saved["snapshot"], target)
    return target


def _single_process() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, TrainerState, dict[str, Any]
]:
    model = workers.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    workers.train_step(model, optimizer, 0)
    trainer = TrainerState()
    return (
        model,
        optimizer,
        trainer,
        {"app": ModelAndOptimizer(model, optimizer), "trainer": trainer},
    )


def _restore(index: RestoreIndex | str, durable: str, events: Recorder) -> tuple[int | None, Any]:
    model, optimizer, trainer, state = _single_process()
    torch.manual_seed(999)
    restorer = SlotRestorer(lambda: index, None, events)
    with Checkpointer(durable, interval_steps=2, on_event=events) as checkpointer:
        step = restore_tiers(restorer, checkpointer, state, events)
    return step, slot_workers.print_of(model, optimizer, trainer)


def test_one_rank_reshards_two_ranks_slots_reading_one_from_a_peer(
    saved: dict[str, Any], shm_dir: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = _copy(saved, shm_dir, "local")
    remote = _copy(saved, shm_dir, "remote")
    index = local_restore_index(local)
    assert isinstance(index, RestoreIndex) and index.step == STEPS
    copy = index.ranks[1]
    assert copy.source.path is not None
    relative = os.path.relpath(copy.source.path, local)
    for name in os.listdir(os.path.join(local, SLOTS_DIR)):  # rank 1 exists only remotely now
        if name.startswith("rank-00001"):
            os.unlink(os.path.join(local, SLOTS_DIR, name))
    server = PeerServer(remote, "secret-token", "127.0.0.1").start()
    # The worker reads the peer with the read token its agent put in a file only it reads.
    token_file = tmp_path / "agent" / "peer-read-token"
    write_private(token_file, read_token("secret-token"))
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv(Env.PEER_TOKEN_FILE, str(token_file))
    try:
        source = Source(endpoint=server.endpoint, relative=relative, kind="replica")
        ranks = (index.ranks[0], dataclasses.replace(copy, source=source))
        peer_index = dataclasses.replace(index, tier="peer", ranks=ranks)
        events = Recorder()
        step, got = _restore(peer_index, saved["durable"], events)
    finally:
        server.close()
    assert step == STEPS
    _assert_same(saved["prints"][STEPS], got)
    restored = events.of("checkpoint_restored")[-1]
    assert restored["tier"] == "peer" and restored["saved_world_size"] == 2
    assert restored["world_size"] == 1


def test_a_corrupted_entry_falls_back_to_durable_storage_naming_the_checksum(
    saved: dict[str, Any], shm_dir: str
) -> None:
    node = _copy(saved, shm_dir, "corrupt")
    index = local_restore_index(node)
    assert isinstance(index, RestoreIndex)
    copy = index.ranks[0]
    assert copy.source.path is not None
    slot = int(copy.source.path.rsplit("-", 1)[-1])
    # The holder's checksums of the good bytes, then bytes flipped inside the first entry.
    sums = checksums_json(SlotRecord(index.step, 0, copy.layout.digest), copy.crcs)
    write_json_atomic(os.path.join(node, SLOTS_DIR, checksums_name(0, slot)), sums)
    entry = copy.layout.entries[0]
    with open(copy.source.path, "r+b") as file:
        file.seek(entry["offset"])
        data = file.read(4)
        file.seek(entry["offset"])
        file.write(bytes(b ^ 0xFF for b in data))
    events = Recorder()
    step, got = _restore(local_restore_index(node), saved["durable"], events)
    assert step == 2
    _assert_same(saved["prints"][2], got)
    skipped = [e for e in events.of("restore_skipped") if e.get("tier") == "memory"]
    assert skipped and "checksum" in skipped[0]["reason"] and entry["fqn"] in skipped[0]["reason"]
    assert events.of("checkpoint_restored")[-1]["tier"] == "durable"


def test_a_slot_without_its_record_is_never_used(saved: dict[str, Any], shm_dir: str) -> None:
    node = _copy(saved, shm_dir, "torn")
    index = local_restore_index(node)
    assert isinstance(index, RestoreIndex) and index.step == STEPS
    copy = index.ranks[0]
    assert copy.source.path is not None
    slot = int(copy.source.path.rsplit("-", 1)[-1])
    # Rank 0 was rewriting this slot when it died: its record gone, its bytes half new.
    os.unlink(os.path.join(node, SLOTS_DIR, record_name(0, slot)))
    with open(copy.source.path, "r+b") as file:
        file.write(b"\x00" * (copy.layout.nbytes // 2))
    older = local_restore_index(node)
    assert isinstance(older, RestoreIndex) and older.step == STEPS - 1
    events = Recorder()
    step, got = _restore(older, saved["durable"], events)
    assert step == STEPS - 1
    _assert_same(saved["prints"][STEPS - 1], got)
    assert events.of("checkpoint_restored")[-1]["tier"] == "memory"


def test_the_live_state_dict_follows_the_training_and_rebuilds_when_tensors_move() -> None:
    """The memory tier's cached state dict: the live tensors, the current learning rate; a
    new one once one of the optimizer's tensors is replaced."""
    model = workers.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    workers.train_step(model, optimizer, 1)
    app = ModelAndOptimizer(model, optimizer)
    first = app.live_state_dict()
    optimizer.param_groups[0]["lr"] = 0.05
    workers.train_step(model, optimizer, 2)
    second = app.live_state_dict()
    assert second is first  # no get_state_dict: the same tensors, updated in place
    fresh = flatten({"app": app.state_dict()})
    live = flatten({"app": second})
    assert sorted(fresh) == sorted(live)
    for fqn, value in fresh.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, live[fqn]), fqn
        else:
            assert value == live[fqn], fqn
    assert live["app.optim.param_groups.0.lr"] == 0.05
    param = next(iter(optimizer.state))
    optimizer.state[param]["exp_avg"] = torch.full_like(optimizer.state[param]["exp_avg"], 7.0)
    rebuilt = app.live_state_dict()  # a state tensor replaced: built again
    assert rebuilt is not first
    assert torch.equal(rebuilt["optim"]["state"]["0.weight"]["exp_avg"], torch.full((96, 96), 7.0))
