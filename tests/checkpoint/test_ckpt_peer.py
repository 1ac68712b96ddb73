"""Memory-tier replication to peers: the pure decisions (ring, acks, retention, tier), the
peer wire (token, paths, checksums), and real holders on loopback TCP over tmpfs with a real
Checkpointer writing the steps: a step commits only once replicated, a lost node's step is
assembled from its peer's replica and restored by DCP, a corrupted copy falls back to the next
copy and then to durable storage, each with its reason, and what a node holds stays bounded."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.layout import node_memory_root, step_dir_name
from trainctl.checkpoint.memory import (
    MEMORY_TIER,
    PEER_TIER,
    STEPS_HELD,
    acks_complete,
    release_node_memory,
    restore_tier_of,
    restore_tiers,
    ring_peers,
    steps_to_drop,
)
from trainctl.checkpoint.peer_wire import PeerError, PeerServer, fetch_file, fetch_range, put_bytes
from trainctl.runtime.memory_tier import MemoryTier

SHM = "/dev/shm"
TOKEN = "t0ken"


@pytest.mark.parametrize(
    ("nodes", "node", "replicas", "hosts", "peers"),
    [
        (["a", "b", "c"], "a", 1, {}, ["b"]),
        (["a", "b", "c"], "c", 1, {}, ["a"]),
        (["a", "b", "c"], "b", 2, {}, ["c", "a"]),
        (["a", "b"], "a", 3, {}, ["b"]),  # fewer nodes than replicas
        (["a"], "a", 1, {}, []),
        (["a", "b"], "a", 0, {}, []),
        (["a", "b", "c"], "z", 1, {}, []),
        # other hosts first: a and b share host h1, so a's replica goes to c on h2
        (["a", "b", "c"], "a", 1, {"a": "h1", "b": "h1", "c": "h2"}, ["c"]),
        (["a", "b", "c"], "a", 2, {"a": "h1", "b": "h1", "c": "h2"}, ["c", "b"]),
    ],
)
def test_ring_peers(
    nodes: list[str], node: str, replicas: int, hosts: dict[str, str], peers: list[str]
) -> None:
    assert ring_peers(nodes, node, replicas, hosts) == peers


def test_acks_complete_names_who_is_missing() -> None:
    assert acks_complete(["a", "b"], ["b", "a"])[0]
    done, why = acks_complete(["a"], ["a", "b", "c"])
    assert not done and why == "waiting for b, c"


@pytest.mark.parametrize(
    ("committed", "present", "dropped"),
    [
        ([], [1, 2, 3], [1]),  # nothing committed: the newest two stay (replicating, writing)
        ([5, 6], [4, 5, 6, 7, 8], [4]),
        ([5, 6], [4, 5, 6, 7, 8, 9], [4, 7]),
        ([3, 5, 6], [3, 5, 6], [3]),
        ([6], [6, 7], []),
    ],
)
def test_steps_to_drop(committed: list[int], present: list[int], dropped: list[int]) -> None:
    assert steps_to_drop(committed, present) == dropped
    assert len(set(present) - set(dropped)) <= STEPS_HELD


def test_restore_tier_of() -> None:
    assert restore_tier_of(["own", "own"]) == MEMORY_TIER
    assert restore_tier_of(["own", "replica"]) == PEER_TIER


@pytest.fixture
def base(tmp_path: Path) -> Iterator[str]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    import shutil
    import uuid

    folder = f"{SHM}/trainctl-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_peer_wire_refuses_a_bad_token_an_escaping_path_and_a_bad_checksum(
    tmp_path: Path,
) -> None:
    server = PeerServer(str(tmp_path), TOKEN, "127.0.0.1").start()
    try:
        put_bytes(server.endpoint, TOKEN, "a/b.bin", b"x" * 1000, bandwidth=1e9)
        assert fetch_file(server.endpoint, TOKEN, "a/b.bin") == b"x" * 1000
        with pytest.raises(PeerError, match="token"):
            fetch_file(server.endpoint, "wrong", "a/b.bin")
        with pytest.raises(PeerError, match="leaves"):
            put_bytes(server.endpoint, TOKEN, "../evil", b"x", bandwidth=1e9)
        with pytest.raises(PeerError, match="bad path"):
            fetch_file(server.endpoint, TOKEN, "/etc/passwd")
        assert not (tmp_path.parent / "evil").exists()
    finally:
        server.close()


def test_peer_wire_serves_a_range_and_refuses_one_past_the_end(tmp_path: Path) -> None:
    server = PeerServer(str(tmp_path), TOKEN, "127.0.0.1").start()
    try:
        data = bytes(range(256)) * 40
        put_bytes(server.endpoint, TOKEN, "s/rank-00000.slot-0", data, bandwidth=1e9)
        assert (
            fetch_range(server.endpoint, TOKEN, "s/rank-00000.slot-0", 300, 1000) == data[300:1300]
        )
        assert fetch_range(server.endpoint, TOKEN, "s/rank-00000.slot-0", len(data), 0) == b""
        with pytest.raises(PeerError, match="outside"):
            fetch_range(server.endpoint, TOKEN, "s/rank-00000.slot-0", len(data) - 10, 11)
    finally:
        server.close()


def _state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(20_000, generator=generator), "extra": {"step": seed}}


def _blank() -> dict[str, Any]:
    return {"w": torch.zeros(20_000), "extra": {"step": -1}}


def _wait(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _holders(base: str, names: list[str], replicas: int) -> dict[str, Holder]:
    holders = {n: Holder("job", n, TOKEN, "127.0.0.1", base=base) for n in names}
    peers = PeerSet(0, {n: h.endpoint for n, h in holders.items()}, replicas)
    for holder in holders.values():
        holder.configure(peers)
    return holders


def _save_steps(base: str, node: str, steps: range) -> None:
    """Rank 0 (world size 1) of `node` saves `steps` into its memory tier, as a worker does."""
    saver = Checkpointer(
        os.path.join(node_memory_root("job", node, base), "own"),
        interval_steps=1,
        keep_last=1_000_000,  # a holder drops replicated steps
        direct_io=False,
        pin_memory=False,
    )
    for step in steps:
        saver.save(step, _state(step))
    saver.close()


def test_a_lost_node_restores_from_its_peers_replica(base: str, tmp_path: Path) -> None:
    holders = _holders(base, ["node-0", "node-1"], replicas=1)
    try:
        _save_steps(base, "node-0", range(1, 4))
        for holder in holders.values():  # each commits once it has every node's ack
            _wait(lambda h=holder: 3 in h.committed_steps(), f"step 3 committed on {holder.node}")
        held = holders["node-1"].path("held", "node-0", step_dir_name(3))
        assert any(name.endswith(".distcp") for name in os.listdir(held))

        # node-0's host dies: its RAM with it. The relaunch on node-1 alone assembles step 3
        # from the replica node-1 holds, and DCP restores it.
        holders.pop("node-0").close()
        assert release_node_memory("job", "node-0", base)
        survivor = holders["node-1"]
        survivor.configure(PeerSet(1, {"node-1": survivor.endpoint}, 1))
        assembly = survivor.assemble()
        assert (assembly.step, assembly.tier) == (3, PEER_TIER), assembly

        events: list[tuple[str, dict[str, Any]]] = []
        memory = MemoryTier.open(
            survivor.root, 1, on_event=lambda *e: events.append(e), pin_memory=False
        )
        durable = Checkpointer(f"file://{tmp_path}/durable", interval_steps=10, pin_memory=False)
        state = _blank()
        assert restore_tiers(memory.restorer, durable, state, memory.restorer.emit) == 3
        assert torch.equal(state["w"], _state(3)["w"])
        restored = [f for name, f in events if name == "checkpoint_restored"]
        assert restored and restored[-1]["tier"] == PEER_TIER
        memory.close()
        durable.close()
    finally:
        for holder in holders.values():
            holder.close()


def test_a_corrupted_copy_falls_back_to_the_next_copy_then_to_durable(
    base: str, tmp_path: Path
) -> None:
    holders = _holders(base, ["node-0", "node-1"], replicas=1)
    try:
        _save_steps(base, "node-0", range(1, 3))
        for holder in holders.values():
            _wait(lambda h=holder: 2 in h.committed_steps(), f"step 2 committed on {holder.node}")
        for holder in holders.values():  # stop replicating: the copies stay as they are
            holder.configure(PeerSet(1, {}, 1))
        own = holders["node-0"].path("own", step_dir_name(2))
        shard = next(n for n in os.listdir(own) if n.endswith(".distcp"))
        _corrupt(os.path.join(own, shard))
        everyone = PeerSet(1, {n: h.endpoint for n, h in holders.items()}, 1)
        holders["node-0"].configure(everyone)
        assembly = holders["node-0"].assemble()
        assert (assembly.step, assembly.tier) == (2, PEER_TIER), assembly
        assert any("memory tier: node-0" in s and "checksum" in s for s in assembly.skipped)

        # The replica is bad too: no memory step; the workers restore durable storage and say
        # why the memory tier was skipped.
        _corrupt(os.path.join(holders["node-1"].path("held", "node-0", step_dir_name(2)), shard))
        assembly = holders["node-0"].assemble()
        assert assembly.step is None, assembly
        assert any("peer tier: node-1" in s and "checksum" in s for s in assembly.skipped)
        durable = Checkpointer(f"file://{tmp_path}/durable", interval_steps=1, pin_memory=False)
        durable.save(1, _state(1))
        durable.wait()
        events: list[tuple[str, dict[str, Any]]] = []
        memory = MemoryTier.open(
            holders["node-0"].root, 1, on_event=lambda *e: events.append(e), pin_memory=False
        )
        memory.report_assembly()
        state = _blank()
        assert restore_tiers(memory.restorer, durable, state, memory.restorer.emit) == 1
        reasons = [f["reason"] for name, f in events if name == "restore_skipped"]
        assert any("checksum" in r for r in reasons), reasons
        memory.close()
        durable.close()
    finally:
        for holder in holders.values():
            holder.close()


def _corrupt(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 64)


def test_what_a_node_holds_stays_bounded(base: str) -> None:
    holders = _holders(base, ["node-0", "node-1"], replicas=1)
    try:
        _save_steps(base, "node-0", range(1, 41))
        _wait(lambda: 40 in holders["node-1"].committed_steps(), "step 40 committed")
        _wait(lambda: len(os.listdir(holders["node-0"].path("own"))) <= 2, "old steps dropped")
        for holder in holders.values():
            for folder in ("own", "acks", "commit", "held/node-0"):
                path = holder.path(folder)
                if os.path.isdir(path):
                    assert len(os.listdir(path)) <= STEPS_HELD, (holder.node, os.listdir(path))
    finally:
        for holder in holders.values():
            holder.close()
