"""Memory-tier holders over slot files: the pure decisions (ring, restore candidates, replication
target, drop rules), the peer wire (token, paths, ranges, in-place held slots refused on a bad
CRC), and real holders on loopback TCP over tmpfs, fed by slot files written the way the
contract (`trainctl.checkpoint.slot_layout`) says a worker writes them: checksums written, and
discarded when the worker rewrote the slot meanwhile; the newest step replicated into
double-buffered held slots; a lost node's ranks restored from its peer's replica, a worker
kill from the nodes' own slots at the step every rank has; a corrupted copy skipped for the
next, and no index at all when none verifies; what a node holds bounded over 200 steps."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest

from trainctl.checkpoint import holder as holder_module
from trainctl.checkpoint.holder import (
    FULL_LOOK_S,
    STATUS_NAME,
    TICK_S,
    Holder,
    PeerSet,
    pause_after,
    tick_delay,
)
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.memory import (
    MEMORY_TIER,
    OWN_SOURCE,
    PEER_TIER,
    REPLICA_SOURCE,
    SlotCopy,
    held_nodes_to_drop,
    newest_replicable,
    release_memory,
    release_node_memory,
    replication_target,
    restore_candidates,
    restore_tier_of,
    ring_peers,
    stale_ranks,
)
from trainctl.checkpoint.peer_wire import (
    PeerError,
    PeerServer,
    catalog,
    fetch_range,
    put_bytes,
    read_token,
    remote_crcs,
)
from trainctl.checkpoint.slot_catalog import MappedSlots, folders_stamp, slot_crcs
from trainctl.checkpoint.slot_layout import (
    HELD_DIR,
    INDEX_NAME,
    RESTORE_DIR,
    SLOTS_DIR,
    Layout,
    RestoreIndex,
    SlotRecord,
    checksums_name,
    layout_name,
    read_json,
    record_name,
    slot_name,
    write_json_atomic,
)
from trainctl.checkpoint.slot_wire import put_slot
from trainctl.recovery.faults import _corrupt_memory

SHM = "/dev/shm"
TOKEN = "t0ken"
SIZES = (1000, 5000, 300)
"""Bytes of each entry of a simulated rank's state."""

# ------------------------------------------------------------------ pure decisions


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


def test_restore_tier_of() -> None:
    assert restore_tier_of(["own", "own"]) == MEMORY_TIER
    assert restore_tier_of(["own", "replica"]) == PEER_TIER


def _copy(rank: int, step: int, kind: str = OWN_SOURCE, local: bool = True, **kw: Any) -> SlotCopy:
    fields: dict[str, Any] = {"attempt": 0, "world_size": 2, "node": "n0", "location": "x"}
    fields.update(kw)
    return SlotCopy(rank=rank, step=step, kind=kind, local=local, **fields)


@pytest.mark.parametrize(
    ("copies", "chosen", "passed"),
    [
        ([], [], 0),
        # worker kill: rank 1 was one step ahead; every rank has 4, only rank 1 has 5
        ([_copy(0, 4), _copy(0, 3), _copy(1, 5), _copy(1, 4)], [(0, 4)], 2),
        # a lost node's rank only as a replica: still whole
        ([_copy(0, 7), _copy(1, 7, REPLICA_SOURCE, False)], [(0, 7)], 0),
        # the newest attempt first, even when an older one reached a later step
        (
            [_copy(0, 9), _copy(1, 9), _copy(0, 6, attempt=1), _copy(1, 6, attempt=1)],
            [(1, 6), (0, 9)],
            0,
        ),
        # world size 3 and rank 2 nowhere: nothing
        ([_copy(0, 2, world_size=3), _copy(1, 2, world_size=3)], [], 1),
    ],
)
def test_restore_candidates(
    copies: list[SlotCopy], chosen: list[tuple[int, int]], passed: int
) -> None:
    candidates, why = restore_candidates(copies)
    assert [(c.attempt, c.step) for c in candidates] == chosen
    assert len(why) == passed


def test_restore_candidates_prefer_own_local_then_own_remote_then_replicas() -> None:
    copies = [
        _copy(0, 1, REPLICA_SOURCE, False, node="c"),
        _copy(0, 1, REPLICA_SOURCE, True, node="a"),
        _copy(0, 1, OWN_SOURCE, False, node="b"),
        _copy(1, 1, OWN_SOURCE, True, node="a"),
    ]
    (candidate,), _ = restore_candidates(copies)
    assert [(c.kind, c.local) for c in candidate.copies[0]] == [
        (OWN_SOURCE, False),
        (REPLICA_SOURCE, True),
        (REPLICA_SOURCE, False),
    ]


def _record(step: int, attempt: int = 0) -> SlotRecord:
    return SlotRecord(step, attempt, "d")


@pytest.mark.parametrize(
    ("held", "wanted", "target"),
    [
        ({}, _record(3), 0),
        ({0: _record(1)}, _record(3), 1),
        ({0: _record(1), 1: _record(2)}, _record(3), 0),  # the older copy, never the newest
        ({0: _record(4), 1: _record(2)}, _record(5), 1),
        ({0: _record(9), 1: _record(2, attempt=1)}, _record(3, attempt=1), 0),
        ({0: _record(3), 1: _record(2)}, _record(3), None),  # already held
        ({0: None, 1: _record(2)}, _record(3), 0),
    ],
)
def test_replication_target(held: dict[int, Any], wanted: SlotRecord, target: int | None) -> None:
    assert replication_target(held, wanted) == target


def test_newest_replicable_stale_ranks_and_held_nodes_to_drop() -> None:
    assert newest_replicable({0: [(0, 4), (0, 5)], 1: [(0, 4), (0, 3)]}) == (0, 4)
    assert newest_replicable({0: [(0, 5)], 1: [(0, 4)]}) is None
    assert newest_replicable({}) is None
    assert stale_ranks({0: 1, 1: 1, 2: 0, 3: 0}, newest_ready=True) == [2, 3]
    assert stale_ranks({0: 1, 2: 0}, newest_ready=False) == []
    assert held_nodes_to_drop(["a", "b"], ["b"], ready=True) == ["a"]
    assert held_nodes_to_drop(["a", "b"], ["b"], ready=False) == []


@pytest.mark.parametrize(
    ("work_s", "duty", "done", "pause"),
    [
        (0.01, 0.1, True, 0.09),  # 10 ms of work -> 90 ms of rest: 10% of a core
        (0.01, 0.5, True, 0.01),
        (0.0, 0.1, True, 0.0),  # nothing to rest for
        (0.0, 0.1, False, TICK_S),  # a failed round waits a tick at least
        (0.5, 0.1, False, 4.5),
        (0.01, 1.0, True, 0.0),  # no bound
        (-1.0, 0.1, True, 0.0),  # a clock step backwards
    ],
)
def test_pause_after_keeps_the_rounds_under_their_duty_cycle(
    work_s: float, duty: float, done: bool, pause: float
) -> None:
    assert pause_after(work_s, duty, done) == pytest.approx(pause)


@pytest.mark.parametrize(
    ("now", "resting_until", "replicating", "delay"),
    [
        (10.0, 0.0, True, TICK_S),  # the round is not resting: look every tick
        (10.0, 10.005, True, TICK_S),  # the pause ends within a tick: still a tick
        (10.0, 10.036, True, 0.036),  # look when the pause ends, not before
        (10.0, 15.0, True, FULL_LOOK_S),  # a long pause: garbage is still collected every 1 s
        (10.0, 0.0, False, FULL_LOOK_S),  # no ring peer: only garbage to collect
        (10.0, 10.036, False, FULL_LOOK_S),
    ],
)
def test_tick_delay_looks_only_when_the_replication_round_can_take_a_step(
    now: float, resting_until: float, replicating: bool, delay: float
) -> None:
    assert tick_delay(now, resting_until, replicating) == pytest.approx(delay)


def test_mapped_slots_sum_as_slot_crcs_and_follow_a_replaced_or_removed_file(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "rank-0.slot-0")
    spans = [(0, 100), (128, 4000), (4096, 0)]
    maps = MappedSlots()
    try:
        for content in (b"a" * 8192, b"b" * 8192, b"c" * 16384):  # rewritten, then replaced
            staged = f"{path}.new"
            with open(staged, "wb") as file:
                file.write(content)
            os.replace(staged, path)
            assert maps.crcs(path, spans) == slot_crcs(path, spans)
            assert maps.crcs(path, spans) == [
                f"{crc32c.crc32c(content[o : o + n]):08x}" for o, n in spans
            ]
        with open(path, "r+b") as file:  # written in place (as a worker does): seen at once
            file.write(b"x" * 100)
        assert maps.crcs(path, spans)[0] == f"{crc32c.crc32c(b'x' * 100):08x}"
        assert len(maps._maps) == 1
        os.unlink(path)
        maps.prune()
        assert maps._maps == {}
        with pytest.raises(OSError):
            maps.crcs(path, spans)
        with open(path, "wb") as file:
            file.write(b"short")
        with pytest.raises(OSError, match="shorter than its layout"):
            maps.crcs(path, spans)
    finally:
        maps.close()


def test_folders_stamp_changes_with_every_rename_and_distrusts_fresh_folders(
    tmp_path: Path,
) -> None:
    folder, missing = tmp_path / "slots", tmp_path / "held"
    folder.mkdir()
    old = time.time_ns() - 10**9
    os.utime(folder, ns=(old, old))
    stamp = folders_stamp([str(folder), str(missing)], 0.05)
    assert stamp is not None and stamp[1] is None
    assert folders_stamp([str(folder), str(missing)], 0.05) == stamp  # nothing changed
    write_json_atomic(str(folder / record_name(0, 0)), {"step": 1})
    assert folders_stamp([str(folder)], 0.05) is None  # just changed: its mtime may be coarse
    os.utime(folder, ns=(old + 1, old + 1))
    assert folders_stamp([str(folder), str(missing)], 0.05) not in (None, stamp)


# ------------------------------------------------------------------ peer wire


def test_peer_wire_refuses_a_bad_token_an_escaping_path_and_writes_outside_held(
    tmp_path: Path,
) -> None:
    server = PeerServer(str(tmp_path), TOKEN, "127.0.0.1").start()
    try:
        put_bytes(server.endpoint, TOKEN, "held/a/b.json", b"{}", bandwidth=1e9)
        assert catalog(server.endpoint, TOKEN, "held") == {"a/b.json": {}}
        with pytest.raises(PeerError, match="token"):
            catalog(server.endpoint, "wrong", "held")
        # The workers' read token (derived from the job's) reads a range and does nothing else.
        reader = read_token(TOKEN)
        assert reader != TOKEN and fetch_range(server.endpoint, reader, "held/a/b.json", 0, 2)
        with pytest.raises(PeerError, match="token"):
            catalog(server.endpoint, reader, "held")
        with pytest.raises(PeerError, match="token"):
            put_bytes(server.endpoint, reader, "held/a/c.json", b"{}", bandwidth=1e9)
        with pytest.raises(PeerError, match="leaves"):
            put_bytes(server.endpoint, TOKEN, "held/../../evil", b"x", bandwidth=1e9)
        with pytest.raises(PeerError, match="only under held"):
            put_bytes(server.endpoint, TOKEN, "slots/rank-00000.slot-0", b"x", bandwidth=1e9)
        with pytest.raises(PeerError, match="bad path"):
            fetch_range(server.endpoint, TOKEN, "/etc/passwd", 0, 1)
        assert not (tmp_path.parent / "evil").exists()
        assert not (tmp_path / "slots").exists()
    finally:
        server.close()


def test_put_slot_keeps_the_senders_crcs_and_serves_the_slot_by_range(tmp_path: Path) -> None:
    server = PeerServer(str(tmp_path / "peer"), TOKEN, "127.0.0.1").start()
    try:
        source = tmp_path / "slot"
        data = bytes(range(256)) * 40
        source.write_bytes(data)
        entries = [(0, 1000), (1024, 3000)]
        crcs = [f"{crc32c.crc32c(data[o : o + n]):08x}" for o, n in entries]
        record = {"step": 3, "attempt": 0, "layout": "d"}
        write_json_atomic(f"{source}.json", record)  # the sender's own record, as a worker's
        held = "held/n0/slots/rank-00000.slot-0"
        put_slot(server.endpoint, TOKEN, held, str(source), record, entries, crcs, 1e9)
        assert read_json(str(tmp_path / "peer" / f"{held}.json")) == record
        assert read_json(str(tmp_path / "peer" / f"{held}.crc.json"))["crcs"] == crcs
        assert remote_crcs(server.endpoint, TOKEN, held, entries) == crcs
        assert fetch_range(server.endpoint, TOKEN, held, 1024, 3000) == data[1024:4024]
        with pytest.raises(PeerError, match="outside"):
            fetch_range(server.endpoint, TOKEN, held, len(data) - 10, 11)
    finally:
        server.close()


# ---------------------------------------------- slot files, as a worker writes them


def _payload(rank: int, step: int, entry: int, nbytes: int) -> bytes:
    return bytes([(rank * 40 + step * 3 + entry) % 251]) * nbytes


class SimRank:
    """One rank's slot files, written per the contract: the layout once, two preallocated slots,
    and per save: record removed, bytes copied in, record written."""

    def __init__(self, root: str, rank: int, world_size: int, attempt: int = 0) -> None:
        self.folder = os.path.join(root, SLOTS_DIR)
        os.makedirs(self.folder, exist_ok=True)
        entries, offset = [], 0
        for i, nbytes in enumerate(SIZES):
            entries.append({"fqn": f"model.w{i}", "offset": offset, "nbytes": nbytes})
            offset = (offset + nbytes + 63) // 64 * 64
        self.layout = Layout(rank, world_size, attempt, offset, tuple(entries))
        self.rank, self.attempt, self.next = rank, attempt, 0
        write_json_atomic(os.path.join(self.folder, layout_name(rank)), self.layout.to_json())
        for slot in range(2):
            with open(os.path.join(self.folder, slot_name(rank, slot)), "wb") as file:
                file.truncate(offset)

    def save(self, step: int) -> int:
        slot, self.next = self.next, 1 - self.next
        record = os.path.join(self.folder, record_name(self.rank, slot))
        if os.path.exists(record):
            os.unlink(record)
        fd = os.open(os.path.join(self.folder, slot_name(self.rank, slot)), os.O_WRONLY)
        try:
            for i, entry in enumerate(self.layout.entries):
                os.pwrite(fd, _payload(self.rank, step, i, entry["nbytes"]), entry["offset"])
        finally:
            os.close(fd)
        write_json_atomic(
            record, {"step": step, "attempt": self.attempt, "layout": self.layout.digest}
        )
        return slot


@pytest.fixture
def base() -> Iterator[str]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    folder = f"{SHM}/trainctl-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Cluster:
    """Simulated nodes on loopback: a real Holder per node, two ranks per node."""

    def __init__(self, base: str, names: list[str], replicas: int = 1) -> None:
        self.base = base
        self.holders = {n: Holder("job", n, TOKEN, "127.0.0.1", base=base) for n in names}
        world = 2 * len(names)
        self.ranks = {
            n: [SimRank(self.root(n), 2 * i + r, world) for r in range(2)]
            for i, n in enumerate(names)
        }
        self.configure(names, replicas)

    def root(self, node: str) -> str:
        return node_memory_root("job", node, self.base)

    def configure(self, names: list[str], replicas: int = 1, attempt: int = 0) -> None:
        peers = PeerSet(attempt, {n: self.holders[n].endpoint for n in names}, replicas)
        for name in names:
            self.holders[name].configure(peers)

    def save(self, step: int, nodes: list[str] | None = None) -> None:
        for node in nodes or list(self.ranks):
            for rank in self.ranks[node]:
                rank.save(step)

    def lose(self, node: str) -> None:
        """The node's host dies: its holder and its RAM (as `LocalScheduler.kill_node`)."""
        self.holders.pop(node).close()
        self.ranks.pop(node)
        assert release_node_memory("job", node, self.base)
        assert not os.path.exists(self.root(node))

    def close(self) -> None:
        for holder in self.holders.values():
            holder.close()


@pytest.fixture
def cluster(base: str) -> Iterator[Cluster]:
    made = Cluster(base, ["node-0", "node-1"])
    yield made
    made.close()


def _wait(predicate: Callable[[], Any], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _read_index(holder: Holder) -> RestoreIndex | None:
    """The holder's restore index; the file holds neither the job's token nor the read token
    (any reader of the node's tmpfs sees it)."""
    path = holder.path(RESTORE_DIR, INDEX_NAME)
    value = read_json(path)
    if value is None:
        return None
    with open(path) as file:
        text = file.read()
    assert TOKEN not in text and read_token(TOKEN) not in text
    assert value["version"] == 2 and all("token" not in r["source"] for r in value["ranks"])
    return RestoreIndex.from_json(value)


def _check_restorable(index: RestoreIndex, step: int) -> None:
    """Read every entry of every rank as the worker's reader does (a local slot in place, a
    remote one by range), check its CRC and that it holds `step`'s bytes."""
    for rank, copy in enumerate(index.ranks):
        assert copy.layout.rank == rank
        for i, entry in enumerate(copy.layout.entries):
            offset, nbytes = entry["offset"], entry["nbytes"]
            if copy.source.path is not None:
                with open(copy.source.path, "rb") as file:
                    file.seek(offset)
                    data = file.read(nbytes)
            else:
                assert copy.source.endpoint and copy.source.relative
                data = bytes(
                    fetch_range(  # as the worker does: with the read token of its environment
                        copy.source.endpoint,
                        read_token(TOKEN),
                        copy.source.relative,
                        offset,
                        nbytes,
                    )
                )
            assert f"{crc32c.crc32c(data):08x}" == copy.crcs[i]
            assert data == _payload(rank, step, i, nbytes), (rank, i)


def _held_steps(holder: Holder, source: str, rank: int) -> dict[int, int]:
    """Held slot index -> step, for held slots whose record and checksums are there."""
    folder = holder.path(HELD_DIR, source, SLOTS_DIR)
    found = {}
    for slot in range(2):
        record = read_json(os.path.join(folder, record_name(rank, slot)))
        sums = read_json(os.path.join(folder, checksums_name(rank, slot)))
        if record and sums and sums["step"] == record["step"]:
            found[slot] = record["step"]
    return found


def _corrupt(path: str, offset: int = 0) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        flipped = bytes(b ^ 0xFF for b in handle.read(64))
        handle.seek(offset)
        handle.write(flipped)


# ------------------------------------------------------------------ real holders


def test_checksums_are_discarded_when_the_worker_rewrites_the_slot_while_summed(
    base: str,
) -> None:
    holder = Holder("job", "node-0", TOKEN, "127.0.0.1", base=base)
    try:
        rank = SimRank(holder.root, 0, 1)
        big = 96 * 2**20  # long enough to sum that the rewrite lands inside it
        layout = Layout(0, 1, 0, big, ({"fqn": "w", "offset": 0, "nbytes": big},))
        write_json_atomic(os.path.join(rank.folder, layout_name(0)), layout.to_json())
        slot = os.path.join(rank.folder, slot_name(0, 0))
        with open(slot, "wb") as file:
            file.truncate(big)
        record = os.path.join(rank.folder, record_name(0, 0))
        write_json_atomic(record, {"step": 1, "attempt": 0, "layout": layout.digest})
        # Not `configure`: its threads would run too; here the test drives every sum (the
        # replication thread's, before it sends a step).
        holder.peers = PeerSet(0, {"node-0": holder.endpoint}, 0)
        result: list[object] = []
        summing = threading.Thread(target=lambda: result.append(holder.checksum((0, 1))))
        summing.start()
        deadline = time.monotonic() + 5
        while not _has_open(slot):  # no sleep: the sum lasts tens of milliseconds
            assert time.monotonic() < deadline, "the holder never summed the slot"
        os.unlink(record)  # the worker: record removed, slot rewritten, record written
        with open(slot, "r+b") as file:
            file.write(b"\x01" * 4096)
        write_json_atomic(record, {"step": 3, "attempt": 0, "layout": layout.digest})
        summing.join(timeout=30)
        crc_path = os.path.join(rank.folder, checksums_name(0, 0))
        assert read_json(crc_path) is None, "a sum of a slot rewritten mid-way was kept"
        assert result == [None], "step 1 is no longer held: nothing to send"
        summed = holder.checksum((0, 3))  # the next round sums the new record
        sums = read_json(crc_path)
        assert summed == {0: (0, tuple(sums["crcs"]))}
        assert sums is not None and sums["step"] == 3
        with open(slot, "rb") as file:
            assert sums["crcs"] == [f"{crc32c.crc32c(file.read()):08x}"]
    finally:
        holder.close()


def _has_open(path: str) -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def test_the_newest_step_is_replicated_into_double_buffered_held_slots(cluster: Cluster) -> None:
    survivor = cluster.holders["node-1"]
    for step in (1, 2, 3):
        cluster.save(step)
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 3), "step 3 replicated")
    assert 3 in _held_steps(survivor, "node-0", 0).values()
    cluster.save(4)
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 4), "step 4 replicated")
    for rank in (0, 1):
        assert sorted(_held_steps(survivor, "node-0", rank).values())[-1] == 4
    held = _held_steps(survivor, "node-0", 0)
    newest = next(slot for slot, step in held.items() if step == 4)

    # A newer step arriving torn (the worker rewrote the slot under the sender: its record is
    # no longer the one summed) is withdrawn from the other held slot; the newest held copy
    # stays valid meanwhile.
    folder = f"{HELD_DIR}/node-0/{SLOTS_DIR}"
    source = os.path.join(cluster.root("node-0"), SLOTS_DIR, slot_name(0, 0))
    layout = cluster.ranks["node-0"][0].layout
    spans = [(e["offset"], e["nbytes"]) for e in layout.entries]
    record = {"step": 5, "attempt": 0, "layout": layout.digest}
    with pytest.raises(PeerError, match="rewritten while it was sent"):
        put_slot(
            survivor.endpoint, TOKEN, f"{folder}/{slot_name(0, 1 - newest)}", source, record,
            spans, ["00000000"] * len(spans), 1e9,
        )  # fmt: skip
    assert _held_steps(survivor, "node-0", 0) == {newest: 4}

    # node-0's host dies: the relaunch on node-1 and a spare restores its ranks from node-1's
    # replica (tier peer), read in place at node-1 by range; node-1's ranks from its own slots.
    cluster.lose("node-0")
    spare = Holder("job", "node-2", TOKEN, "127.0.0.1", base=cluster.base)
    cluster.holders["node-2"] = spare
    cluster.configure(["node-1", "node-2"], attempt=1)
    assembly = spare.assemble()
    assert (assembly.step, assembly.tier) == (4, PEER_TIER), assembly
    index = _read_index(spare)
    assert index is not None and (index.step, index.tier) == (4, PEER_TIER)
    for rank in (0, 1):
        source_of = index.ranks[rank].source
        assert (source_of.kind, source_of.endpoint) == (REPLICA_SOURCE, survivor.endpoint)
        assert source_of.relative and source_of.relative.startswith("held/node-0/slots/")
    assert index.ranks[2].source.kind == OWN_SOURCE
    assert index.ranks[2].source.relative == f"{SLOTS_DIR}/{slot_name(2, 1)}"
    _check_restorable(index, 4)

    # Shrink to node-1 alone: the same step, every copy read in place.
    cluster.configure(["node-1"], attempt=1)
    assert survivor.assemble().step == 4
    index = _read_index(survivor)
    assert index is not None and index.tier == PEER_TIER
    assert all(copy.source.path is not None for copy in index.ranks)
    _check_restorable(index, 4)


def test_a_worker_kill_restores_the_step_every_rank_has_from_own_copies(cluster: Cluster) -> None:
    for step in (1, 2, 3, 4):
        cluster.save(step)
    cluster.ranks["node-1"][1].save(5)  # rank 3 got one step ahead before the kill
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 4), "step 4 replicated")
    holder = cluster.holders["node-0"]
    cluster.configure(["node-0", "node-1"], attempt=1)
    assembly = holder.assemble()
    assert (assembly.step, assembly.tier) == (4, MEMORY_TIER), assembly
    assert assembly.skipped == ()
    index = _read_index(holder)
    assert index is not None
    assert [c.source.kind for c in index.ranks] == [OWN_SOURCE] * 4
    assert index.ranks[0].source.path is not None  # local: in place
    assert index.ranks[3].source.endpoint == cluster.holders["node-1"].endpoint
    _check_restorable(index, 4)


def test_a_corrupted_copy_falls_back_to_the_replica_then_to_no_index(cluster: Cluster) -> None:
    for step in (1, 2):
        cluster.save(step)
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 2), "step 2 replicated")
    _wait(lambda: cluster.holders["node-1"].replicated == (0, 2), "step 2 replicated")
    holder = cluster.holders["node-0"]
    own = os.path.join(cluster.root("node-0"), SLOTS_DIR, slot_name(0, 1))  # step 2 of rank 0
    _corrupt(own, offset=1024)  # inside entry 1
    cluster.configure(["node-0", "node-1"], attempt=1)
    assembly = holder.assemble()
    assert (assembly.step, assembly.tier) == (2, PEER_TIER), assembly
    assert any(
        s.startswith("memory tier: node-0:slots/rank-00000.slot-1") and "entry 1 (model.w1)" in s
        for s in assembly.skipped
    ), assembly.skipped
    index = _read_index(holder)
    assert index is not None and index.ranks[0].source.kind == REPLICA_SOURCE
    _check_restorable(index, 2)

    # node-0 is lost and every replica of its rank 0 is bad too: no memory step at all; the
    # status says why, for the workers to report (restore_skipped) before durable storage.
    survivor = cluster.holders["node-1"]
    cluster.lose("node-0")
    held = _held_steps(survivor, "node-0", 0)
    assert 2 in held.values()
    for slot in held:
        _corrupt(survivor.path(HELD_DIR, "node-0", SLOTS_DIR, slot_name(0, slot)))
    cluster.configure(["node-1"], attempt=1)
    assembly = survivor.assemble()
    assert assembly.step is None and assembly.tier is None, assembly
    assert _read_index(survivor) is None
    status = read_json(survivor.path(RESTORE_DIR, STATUS_NAME))
    assert status is not None and status["step"] is None
    assert any(
        s.startswith("peer tier: node-1:held/node-0") and "checksum" in s for s in status["skipped"]
    )
    assert any("no valid copy of rank(s) 0" in s for s in status["skipped"])


def test_a_node_and_its_replicas_holder_both_lost_leave_no_memory_step(base: str) -> None:
    cluster = Cluster(base, ["node-0", "node-1", "node-2"])  # ring: 0 -> 1 -> 2 -> 0
    try:
        for step in (1, 2):
            cluster.save(step)
        for node in ("node-0", "node-1", "node-2"):
            holder = cluster.holders[node]
            _wait(lambda h=holder: h.replicated == (0, 2), f"{node}'s step 2 replicated")
        cluster.lose("node-1")
        cluster.lose("node-2")  # it held node-1's replicas
        survivor = cluster.holders["node-0"]
        cluster.configure(["node-0"], attempt=1)
        assembly = survivor.assemble()
        assert assembly.step is None and _read_index(survivor) is None, assembly
        assert any(
            "memory step 2 (attempt 0): no valid copy of rank(s) 2, 3 on any reachable node" in s
            for s in assembly.skipped
        ), assembly.skipped
    finally:
        cluster.close()


def test_a_holder_sums_only_what_it_sends_and_the_restore_sums_the_chosen_copy(
    base: str,
) -> None:
    cluster = Cluster(base, ["node-0", "node-1"], replicas=0)  # nothing to send
    try:
        for step in (1, 2, 3):
            cluster.save(step)
        holder = cluster.holders["node-0"]
        _wait(lambda: holder._looked is not None, "a tick that read the folders")
        folder = os.path.join(cluster.root("node-0"), SLOTS_DIR)
        assert not [n for n in os.listdir(folder) if n.endswith(".crc.json")]
        cluster.configure(["node-0", "node-1"], attempt=1)
        assembly = holder.assemble()
        assert (assembly.step, assembly.tier) == (3, MEMORY_TIER), assembly
        index = _read_index(holder)
        assert index is not None
        _check_restorable(index, 3)  # the CRCs taken at the restore guard every read
        # Summed once there, the chosen own copies only (step 3's slots, not step 2's).
        assert sorted(n for n in os.listdir(folder) if n.endswith(".crc.json")) == [
            f"{slot_name(rank, 0)}.crc.json" for rank in (0, 1)
        ]
    finally:
        cluster.close()


def test_the_corrupt_memory_fault_makes_a_nodes_own_copies_fail_their_checksums() -> None:
    job = f"test-corrupt-{uuid.uuid4().hex[:8]}"
    holder = Holder(job, "node-0", TOKEN, "127.0.0.1")  # the fault's base: /dev/shm
    try:
        ranks = [SimRank(holder.root, rank, 2) for rank in range(2)]
        holder.configure(PeerSet(0, {"node-0": holder.endpoint}, 0))
        for step in (1, 2):
            for rank in ranks:
                rank.save(step)
        # Whether the holder summed them yet or not, the flipped bytes are caught.
        assert "4 memory slot file(s)" in _corrupt_memory(job, "node-0")
        assembly = holder.assemble()
        assert assembly.step is None, assembly
        assert sum("fails its checksum" in s for s in assembly.skipped) == 4, assembly.skipped
    finally:
        holder.close()
        release_memory(job)


def _bytes_under(path: str) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:  # a temporary name renamed meanwhile
                pass
    return total


def test_what_a_node_holds_stays_bounded_and_old_copies_go(cluster: Cluster) -> None:
    state = cluster.ranks["node-0"][0].layout.nbytes
    # 2 slots x (own + 1 replica) x 2 ranks, plus the small JSON records
    bound = 2 * 2 * 2 * state + 64 * 1024
    peak = 0
    for step in range(1, 201):
        cluster.save(step)
        if step % 10 == 0:
            for node in cluster.holders:
                peak = max(peak, _bytes_under(cluster.root(node)))
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 200), "step 200 replicated")
    assert peak <= bound, (peak, bound)

    # A new attempt without node-0 (lost) and with a spare: once its ranks save, node-1 drops
    # the replicas it held for node-0 and the spare holds node-1's.
    cluster.lose("node-0")
    cluster.holders["node-2"] = Holder("job", "node-2", TOKEN, "127.0.0.1", base=cluster.base)
    cluster.configure(["node-1", "node-2"], attempt=1)
    assert cluster.holders["node-2"].assemble().step == 200
    cluster.ranks = {
        n: [SimRank(cluster.root(n), 2 * i + r, 4, attempt=1) for r in range(2)]
        for i, n in enumerate(["node-1", "node-2"])
    }
    cluster.save(201)
    survivor = cluster.holders["node-1"]
    _wait(
        lambda: not os.path.exists(survivor.path(HELD_DIR, "node-0")), "node-0's replicas dropped"
    )
    _wait(lambda: survivor.replicated == (1, 201), "step 201 replicated to the spare")
    for node in cluster.holders:
        assert _bytes_under(cluster.root(node)) <= bound


def test_a_sender_that_trusts_its_own_puts_finds_a_wiped_peer_again(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between catalog requests a sender trusts what its puts left at the peer; when the peer
    lost its held copies meanwhile (its host restarted them, a drop), the next catalog (at most
    `RECATALOG_S` later) finds them gone and the layout and a slot are sent again."""
    monkeypatch.setattr(holder_module, "RECATALOG_S", 0.2)
    survivor = cluster.holders["node-1"]
    cluster.save(1)
    _wait(lambda: cluster.holders["node-0"].replicated == (0, 1), "step 1 replicated")
    shutil.rmtree(survivor.path(HELD_DIR, "node-0"))
    for step in (2, 3):
        cluster.save(step)
        _wait(lambda step=step: cluster.holders["node-0"].replicated == (0, step), "replicated")
        time.sleep(0.25)
    cluster.save(4)
    _wait(lambda: 4 in _held_steps(survivor, "node-0", 1).values(), "step 4 held again")
    folder = survivor.path(HELD_DIR, "node-0", SLOTS_DIR)
    for rank in (0, 1):
        assert os.path.exists(os.path.join(folder, layout_name(rank)))
    cluster.lose("node-0")
    spare = Holder("job", "node-2", TOKEN, "127.0.0.1", base=cluster.base)
    cluster.holders["node-2"] = spare
    cluster.configure(["node-1", "node-2"], attempt=1)
    assert (spare.assemble().step, spare.assemble().tier) == (4, PEER_TIER)
    index = _read_index(spare)
    assert index is not None
    _check_restorable(index, 4)
