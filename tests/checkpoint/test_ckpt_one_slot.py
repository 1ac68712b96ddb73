"""``checkpoint.memory.slots: 1``: one slot per copy, and a rank's own slot and its replica never
torn at once (real SlotWriters, real holders on loopback, real slot files in /dev/shm)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.memory import (
    FREE_AFTER_FAILED_ROUNDS,
    MEMORY_TIER,
    PEER_TIER,
    SLOT_BUFFER_BYTES,
    Permit,
    may_overwrite,
    memory_budget,
    permit_of,
)
from trainctl.checkpoint.slot_layout import (
    HELD_DIR,
    PERMIT_NAME,
    SLOTS_DIR,
    read_json,
    record_name,
    slot_lock,
    slot_name,
)
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slot_permit import PermitWriter
from trainctl.checkpoint.slots import SlotWriter
from trainctl.runtime.memory_tier import MemoryTier
from trainctl.spec import CheckpointSpec

pytestmark = pytest.mark.timeout(300)
SHM = "/dev/shm"
TOKEN = "one-slot-test-token"
A = (0, 5)  # (attempt, step)


@pytest.mark.parametrize(
    ("held", "permit", "replicas", "slots", "ok"),
    [
        (A, Permit(None, False), 1, 2, True),  # two slots: the other one stays whole
        (A, Permit(None, False), 0, 1, True),  # no replicas: nothing to wait for
        (None, Permit(None, False), 1, 1, True),  # no whole copy to keep
        (A, None, 1, 1, True),  # no holder's word: nobody replicates
        (A, Permit(None, True), 1, 1, True),  # freed: no replica can complete
        (A, Permit(A, False), 1, 1, True),  # its step is replicated
        (A, Permit((0, 4), False), 1, 1, False),  # an older step is: keep this one
        (A, Permit(None, False), 1, 1, False),  # none since the attempt began
        (A, Permit((1, 5), False), 2, 1, False),  # another attempt's step 5
    ],
)
def test_may_overwrite(
    held: tuple[int, int] | None, permit: Permit | None, replicas: int, slots: int, ok: bool
) -> None:
    assert may_overwrite(held, permit, replicas, slots) is ok


@pytest.mark.parametrize(
    ("targets", "failed", "apart", "free"),
    [
        (True, 0, False, False),
        (False, 0, False, True),  # no ring peer (one node): nothing to wait for
        (True, FREE_AFTER_FAILED_ROUNDS - 1, False, False),
        (True, FREE_AFTER_FAILED_ROUNDS, False, True),  # the peer is likely dead
        (True, 0, True, True),  # local ranks skipped apart: nothing replicable
    ],
)
def test_permit_of(targets: bool, failed: int, apart: bool, free: bool) -> None:
    permit = permit_of(A, targets, failed, apart)
    assert permit == Permit(A, free)
    assert Permit.from_json(permit.to_json()) == permit
    assert Permit.from_json({"attempt": None, "step": None, "free": False}) == Permit(None, False)
    assert Permit.from_json({"step": 1}) is None


@pytest.mark.parametrize("replicas", [0, 1, 2])
def test_the_budget_with_one_slot_is_one_plus_replicas_states_and_the_buffer(
    replicas: int,
) -> None:
    state, ranks = 10 * 2**20, 2
    needed = ((1 + replicas) * state + SLOT_BUFFER_BYTES) * ranks
    assert memory_budget(state, ranks, needed, replicas, slots=1).fits
    short = memory_budget(state, ranks, needed - 1, replicas, slots=1)
    assert not short.fits and "1 slot x" in short.reason
    assert not memory_budget(state, ranks, needed, replicas, slots=2).fits


def test_the_slots_field_defaults_to_two_and_takes_one() -> None:
    assert CheckpointSpec().memory.slots == 2
    assert CheckpointSpec.model_validate({"memory": {"slots": 1}}).memory.slots == 1
    for bad in (0, 3):
        with pytest.raises(ValueError, match="slots"):
            CheckpointSpec.model_validate({"memory": {"slots": bad}})


# ---------------------------------------------- real writers and holders


def _flat(rank: int, step: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(rank * 1000 + step)
    return {
        "model.w": torch.randn(64, 64, generator=generator),
        "model.b": torch.randn(4096, generator=generator),
        "step": step,
    }


def _wait(predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class OneSlotCluster:
    """Two simulated nodes on loopback, one rank each, ``slots: 1`` and one replica."""

    def __init__(self, base: str, names: list[str]) -> None:
        self.base = base
        self.holders = {n: Holder("job", n, TOKEN, "127.0.0.1", base=base) for n in names}
        self.writers: dict[str, SlotWriter] = {}
        self.configure(names, attempt=0)

    def root(self, node: str) -> str:
        return node_memory_root("job", node, self.base)

    def configure(self, names: list[str], attempt: int) -> None:
        peers = PeerSet(attempt, {n: self.holders[n].endpoint for n in names}, 1, slots=1)
        for name in names:
            self.holders[name].configure(peers)
        for writer in self.writers.values():
            writer.close()
        self.writers = {
            n: SlotWriter(self.root(n), i, len(names), attempt, slots=1, replicas=1)
            for i, n in enumerate(names)
        }

    def save(self, step: int) -> dict[str, int | None]:
        return {n: w.save(step, _flat(w.rank, step)) for n, w in self.writers.items()}

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        for holder in self.holders.values():
            holder.close()


@pytest.fixture
def cluster() -> Iterator[OneSlotCluster]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm")
    base = f"{SHM}/trainctl-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(base)
    made = OneSlotCluster(base, ["node-0", "node-1"])
    yield made
    made.close()
    shutil.rmtree(base, ignore_errors=True)


def _own_step(cluster: OneSlotCluster, node: str) -> int | None:
    value = read_json(
        os.path.join(cluster.root(node), SLOTS_DIR, record_name(0 if node == "node-0" else 1, 0))
    )
    return None if value is None else int(value["step"])


def _permitted(cluster: OneSlotCluster, node: str, step: int) -> None:
    """Wait until `node`'s holder told its worker that `step` (attempt 0) is replicated."""
    permit = os.path.join(cluster.root(node), SLOTS_DIR, PERMIT_NAME)
    expected = {"attempt": 0, "step": step, "free": False}
    _wait(lambda: read_json(permit) == expected, f"{node}'s permit for step {step}")


def test_a_single_slot_is_rewritten_only_once_its_step_is_replicated(
    cluster: OneSlotCluster,
) -> None:
    holder = cluster.holders["node-0"]
    permit = os.path.join(cluster.root("node-0"), SLOTS_DIR, PERMIT_NAME)
    assert read_json(permit) == {"attempt": None, "step": None, "free": False}
    assert cluster.save(1) == {"node-0": 0, "node-1": 0}  # nothing held yet: written
    # Until step 1 is replicated, later saves are skipped and step 1 stays whole.
    _wait(lambda: holder.replicated == (0, 1), "step 1 replicated")
    _wait(lambda: read_json(permit) == {"attempt": 0, "step": 1, "free": False}, "the permit")
    saved = {step: cluster.save(step) for step in range(2, 40)}
    written = [step for step, by in saved.items() if by["node-0"] is not None]
    assert written, "a replicated step is overwritten by the next save"
    skipped = [step for step, by in saved.items() if by["node-0"] is None]
    assert cluster.writers["node-0"].skipped == len(skipped)
    # Only one slot file per rank here and one held slot per rank at the peer.
    own = sorted(os.listdir(os.path.join(cluster.root("node-0"), SLOTS_DIR)))
    assert [n for n in own if n.startswith("rank-") and n[-1].isdigit()] == [slot_name(0, 0)]
    held = os.path.join(cluster.holders["node-1"].root, HELD_DIR, "node-0", SLOTS_DIR)
    _wait(lambda: os.path.exists(os.path.join(held, record_name(0, 0))), "a held record")
    assert not os.path.exists(os.path.join(held, slot_name(0, 1)))


def test_a_slot_being_sent_is_never_rewritten(cluster: OneSlotCluster) -> None:
    cluster.save(1)
    _permitted(cluster, "node-0", 1)
    path = os.path.join(cluster.root("node-0"), SLOTS_DIR, slot_name(0, 0))
    with slot_lock(path):  # as the holder holds it while it sends the slot
        writer = cluster.writers["node-0"]
        assert writer.save(2, _flat(0, 2)) is None and writer.skipped == 1
    assert writer.save(2, _flat(0, 2)) == 0


def test_a_kill_mid_rewrite_restores_from_the_replica(cluster: OneSlotCluster) -> None:
    """A worker killed while it rewrites its single slot (record removed, bytes half new) leaves
    the slot unused: the restore takes the replica of the step it held (tier peer)."""
    cluster.save(1)
    for node in cluster.holders:
        _permitted(cluster, node, 1)
    # node-1's rank saved step 2 too and its holder replicated it; node-0's rank died mid-save.
    assert cluster.writers["node-1"].save(2, _flat(1, 2)) == 0
    folder = os.path.join(cluster.root("node-0"), SLOTS_DIR)
    os.unlink(os.path.join(folder, record_name(0, 0)))  # the writer's first move
    with open(os.path.join(folder, slot_name(0, 0)), "r+b") as file:
        file.write(b"\xff" * 4096)  # half of the new step's bytes
    cluster.writers["node-0"].close()
    cluster.configure(["node-0", "node-1"], attempt=1)
    assembly = cluster.holders["node-0"].assemble()
    # Rank 0 has step 1 only as node-1's replica; rank 1 has steps 1 (replica) and 2 (own).
    assert (assembly.step, assembly.tier) == (1, PEER_TIER), assembly


def test_a_worker_kill_between_saves_restores_from_own_slots(cluster: OneSlotCluster) -> None:
    for step in (1, 2, 3):
        cluster.save(step)
    steps = {n: _own_step(cluster, n) for n in cluster.holders}
    assert len(set(steps.values())) == 1, steps  # one node, one rank: the same steps saved
    for writer in cluster.writers.values():
        writer.close()
    cluster.configure(["node-0", "node-1"], attempt=1)
    assembly = cluster.holders["node-0"].assemble()
    assert (assembly.step, assembly.tier) == (steps["node-0"], MEMORY_TIER), assembly


def test_a_new_attempt_replicates_the_restored_step_before_overwriting_it(
    cluster: OneSlotCluster,
) -> None:
    cluster.save(1)
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 1), "step 1 replicated")
    cluster.configure(["node-0", "node-1"], attempt=1)  # replicated is forgotten: new peers
    holder = cluster.holders["node-0"]
    _wait(lambda: holder.replicated == (0, 1), "step 1 known replicated in the new attempt")
    _wait(lambda: cluster.writers["node-0"].save(2, _flat(0, 2)) is not None, "a save")


def test_a_peer_that_stopped_answering_frees_the_workers(cluster: OneSlotCluster) -> None:
    """node-1's holder is gone (its host died): no replica of node-0's steps can complete, so
    after `FREE_AFTER_FAILED_ROUNDS` failed rounds node-0's holder frees its workers, and they
    save every interval again instead of skipping (with their older copy) for good."""
    cluster.save(1)
    _permitted(cluster, "node-0", 1)
    cluster.holders["node-1"].close()
    writer = cluster.writers["node-0"]
    assert writer.save(2, _flat(0, 2)) == 0  # step 1 is replicated: its slot may be rewritten
    permit = os.path.join(cluster.root("node-0"), SLOTS_DIR, PERMIT_NAME)
    # Step 2 never reaches node-1: until the holder gives up, saves keep step 2 and skip.
    _wait(lambda: read_json(permit)["free"] is True, "the permit freed", timeout_s=60)
    assert read_json(permit)["step"] == 1  # what was replicated, still said
    skipped = writer.skipped
    assert [writer.save(step, _flat(0, step)) for step in range(3, 8)] == [0] * 5
    assert writer.skipped == skipped
    assert _own_step(cluster, "node-0") == 7


def test_one_node_alone_is_never_held_back(base_one: str) -> None:
    holder = Holder("job", "solo", TOKEN, "127.0.0.1", base=base_one)
    try:
        holder.configure(PeerSet(0, {"solo": holder.endpoint}, 1, slots=1))
        root = node_memory_root("job", "solo", base_one)
        assert read_json(os.path.join(root, SLOTS_DIR, PERMIT_NAME))["free"] is True
        writer = SlotWriter(root, 0, 1, 0, slots=1, replicas=1)
        assert all(writer.save(step, _flat(0, step)) == 0 for step in range(1, 6))
        writer.close()
    finally:
        holder.close()


def _skip_events(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, int, str]]:
    return [
        (fields["step"], fields["skipped"], fields["tier"])
        for name, fields in events
        if name == "checkpoint_skipped"
    ]


@pytest.mark.parametrize(("slots", "window_s"), [(1, 3600.0), (1, 0.0), (2, 0.0)])
def test_skipped_memory_saves_are_said_without_an_event_a_step(
    base_one: str, slots: int, window_s: float
) -> None:
    """A holder that never replicates (its permit: nothing yet, not free): with one slot every
    save after the first is skipped, said at the first skip and then once a window, and what
    is left at close; two slots never skip."""
    root = node_memory_root("job", "node-0", base_one)
    PermitWriter(os.path.join(root, SLOTS_DIR)).publish(None, True, 0, False)
    events: list[tuple[str, dict[str, Any]]] = []
    tier = MemoryTier.open(
        root,
        1,
        on_event=lambda name, fields: events.append((name, fields)),
        replicas=1,
        slots=slots,
        skip_report_s=window_s,
    )
    for step in range(1, 6):
        tier.save(step, _flat(0, step))
    said_before_close = _skip_events(events)
    tier.close()
    if slots == 2:
        assert _skip_events(events) == [] and tier.writer.skipped == 0
        return
    assert tier.writer.skipped == 4
    if window_s:  # the first skip at once, the other three at close
        assert said_before_close == [(2, 1, MEMORY_TIER)]
        assert _skip_events(events) == [(2, 1, MEMORY_TIER), (5, 3, MEMORY_TIER)]
    else:
        assert _skip_events(events) == [(step, 1, MEMORY_TIER) for step in range(2, 6)]
    reason = next(fields["reason"] for name, fields in events if name == "checkpoint_skipped")
    assert "the slot's step 1 is not replicated yet" in reason and "memory.slots: 2" in reason


@pytest.fixture
def base_one() -> Iterator[str]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm")
    base = f"{SHM}/trainctl-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _bytes_under(path: str) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:
                pass
    return total


def test_one_slot_holds_one_plus_replicas_states_over_200_steps(cluster: OneSlotCluster) -> None:
    peak = 0
    for step in range(1, 201):
        cluster.save(step)
        if step % 10 == 0:
            peak = max(peak, *(_bytes_under(cluster.root(n)) for n in cluster.holders))
    state = cluster.writers["node-0"].nbytes
    assert peak <= (1 + 1) * state + 64 * 1024, (peak, state)
    assert all(w.skipped < 200 for w in cluster.writers.values())


WRITER = """
import sys, torch
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slots import SlotWriter
writer = SlotWriter(sys.argv[1], 0, 1, 0, slots=1, replicas=0)
flat = {"w": torch.zeros(16 * 2**20)}  # 64 MiB: a save takes long enough to be killed in
step = 0
while True:
    step += 1
    flat["w"].fill_(step)
    writer.save(step, flat)
"""


def test_a_worker_sigkilled_mid_rewrite_leaves_no_usable_copy(base_one: str) -> None:
    """A real worker process SIGKILLed while it rewrites its single slot: the slot has no record,
    so no restore reads it (without replicas, durable storage restores)."""
    root = node_memory_root("job", "solo", base_one)
    record = os.path.join(root, SLOTS_DIR, record_name(0, 0))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    caught = False
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", WRITER, root], env=env)
        try:
            _wait(lambda: (read_json(record) or {}).get("step", 0) >= 2, "two saves", 60)
            _wait(lambda: not os.path.exists(record), "a save under way")
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        index = local_restore_index(root)
        if not os.path.exists(record):  # killed mid-write: the torn slot is never used
            caught = True
            assert isinstance(index, str) and "no step" in index, index
            break
        # The write finished before the signal landed: the slot is whole and says so.
        assert not isinstance(index, str)
        shutil.rmtree(root, ignore_errors=True)
    assert caught, "never caught a save under way in 5 tries"
