"""A node's memory-tier holder: checksums its ranks' slots, replicates the newest whole step to
its ring peers and chooses the step a relaunch restores (`trainctl.checkpoint.memory` has the
design, `trainctl.checkpoint.slot_layout` the files).

It runs inside the node agent (a server thread, a checksum thread and a replication thread),
so it outlives the workers and dies with the node. `configure` gives it the attempt's holders;
`tick` (every `TICK_S`) sums every new slot record of the node's ranks (discarding the sums
when the record changed meanwhile: the worker rewrote the slot), hands the newest step every
local rank has summed to the replication thread, and drops what an older attempt or a node no
longer in the attempt left; `assemble` (the agent, before torchrun starts) writes
``restore/index.json`` (`trainctl.checkpoint.slot_assemble`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping

from trainctl.checkpoint.layout import MEMORY_BASE, node_memory_root
from trainctl.checkpoint.memory import (
    held_nodes_to_drop,
    newest_replicable,
    replication_target,
    ring_peers,
    stale_ranks,
)
from trainctl.checkpoint.peer_wire import PeerError, PeerServer, catalog, put_bytes, put_slot
from trainctl.checkpoint.slot_assemble import STATUS_NAME, Assembly, assemble
from trainctl.checkpoint.slot_catalog import (
    JsonCache,
    RankSlots,
    checksums_json,
    parse_slots,
    read_json_tree,
    record_json,
    slot_crcs,
    spans,
)
from trainctl.checkpoint.slot_layout import (
    HELD_DIR,
    SLOT_COUNT,
    SLOTS_DIR,
    SlotChecksums,
    SlotRecord,
    checksums_name,
    layout_name,
    read_json,
    record_name,
    slot_name,
    write_json_atomic,
)

__all__ = ["STATUS_NAME", "Assembly", "Holder", "PeerSet"]

log = logging.getLogger(__name__)

TICK_S = 0.02
"""How often the holder looks for new slot records."""
BANDWIDTH = 1e9
"""Bytes/s one holder sends to its peers at most (replication must leave the network to the
durable tier's uploads and the training's collectives)."""


@dataclasses.dataclass(frozen=True)
class PeerSet:
    """The holders of one attempt: its nodes in plan order and their endpoints (host:port)."""

    attempt: int
    endpoints: dict[str, str]
    replicas: int

    @property
    def nodes(self) -> list[str]:
        return list(self.endpoints)

    def hosts(self) -> dict[str, str]:
        return {node: end.rsplit(":", 1)[0] for node, end in self.endpoints.items()}

    def targets(self, node: str) -> list[str]:
        """The nodes that hold `node`'s replicas."""
        return ring_peers(self.nodes, node, self.replicas, self.hosts())

    def sources(self, node: str) -> list[str]:
        """The nodes whose replicas `node` holds."""
        return [peer for peer in self.nodes if node in self.targets(peer)]


def _sums_of(value: object, record: SlotRecord) -> bool:
    """Whether the checksums document `value` is that of the slot holding `record`."""
    sums = SlotChecksums.from_json(value)
    return sums is not None and (sums.step, sums.layout) == (record.step, record.layout)


def _newest_attempt(ranks: Mapping[int, RankSlots]) -> dict[int, RankSlots]:
    """The ranks whose layout belongs to the newest attempt among `ranks`."""
    if not ranks:
        return {}
    newest = max(slots.layout.attempt for slots in ranks.values())
    return {rank: slots for rank, slots in ranks.items() if slots.layout.attempt == newest}


def _ready(ranks: Mapping[int, RankSlots]) -> bool:
    """Whether every rank of the newest attempt has a summed slot of that attempt."""
    newest = _newest_attempt(ranks)
    return bool(newest) and all(
        any(r.attempt == slots.layout.attempt for r in slots.checksummed().values())
        for slots in newest.values()
    )


class Holder:
    """The memory tier of node `node` of job `job_id` on this host, served on `host`."""

    def __init__(
        self,
        job_id: str,
        node: str,
        token: str,
        host: str,
        base: str = MEMORY_BASE,
        bandwidth: float = BANDWIDTH,
    ) -> None:
        self.node = node
        self.root = node_memory_root(job_id, node, base)
        self.token = token
        self.bandwidth = bandwidth
        self.peers: PeerSet | None = None
        self.replicated: tuple[int, int] | None = None
        """The (attempt, step) last replicated to every ring peer."""
        self._lock = threading.Lock()
        self._cache = JsonCache()
        self._wanted: tuple[int, int] | None = None
        self._floor = -1
        """The newest attempt whose layouts were here when the attempt was configured: ranks of
        a newer one are the configured attempt's workers."""
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self.server = PeerServer(self.root, token, host).start()
        # Started by the first `configure`: a job without the memory tier never configures,
        # and its agents keep no thread polling every TICK_S.
        self._threads = [
            threading.Thread(target=self._loop, name="trainctl-holder", daemon=True),
            threading.Thread(target=self._replicate_loop, name="trainctl-replica", daemon=True),
        ]

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def configure(self, peers: PeerSet) -> None:
        """Serve the attempt `peers` (this node among them) from now on."""
        with self._lock:
            self.peers = peers
            self._floor = max((s.layout.attempt for s in self._own_slots().values()), default=-1)
            if not self._stop.is_set():
                for thread in self._threads:
                    if not thread.is_alive():
                        thread.start()

    # ------------------------------------------------------------------ checksums (thread)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the tier is an optimisation: never kill the agent for it
                log.exception("memory holder %s", self.node)

    def tick(self) -> None:
        """One pass: sum new slot records, hand the newest whole step to replication, drop
        what is no longer needed."""
        with self._lock:
            peers = self.peers
            if peers is None or self.node not in peers.endpoints:
                return
            ranks = self._own_slots()
            if self._checksum(ranks):
                ranks = self._own_slots()
            local = _newest_attempt(ranks)
            wanted = newest_replicable(
                {
                    rank: [(r.attempt, r.step) for r in slots.checksummed().values()]
                    for rank, slots in local.items()
                }
            )
            if wanted is not None and wanted != self._wanted and peers.targets(self.node):
                with self._wake:
                    self._wanted = wanted
                    self._wake.notify()
            self._collect_garbage(ranks, peers)

    def _own_slots(self) -> dict[int, RankSlots]:
        return parse_slots(read_json_tree(self.path(SLOTS_DIR), self._cache))

    def _checksum(self, ranks: Mapping[int, RankSlots]) -> bool:
        """Sum every slot whose record has no checksums yet; whether any were written."""
        wrote = False
        for rank, slots in sorted(ranks.items()):
            for index, record in sorted(slots.records.items()):
                if index in slots.checksums:
                    continue
                try:
                    crcs = slot_crcs(
                        self.path(SLOTS_DIR, slot_name(rank, index)), spans(slots.layout)
                    )
                except OSError as error:
                    log.debug("memory holder %s: %s", self.node, error)
                    continue
                again = SlotRecord.from_json(
                    read_json(self.path(SLOTS_DIR, record_name(rank, index)))
                )
                if again != record:  # the worker rewrote the slot while it was summed
                    continue
                target = self.path(SLOTS_DIR, checksums_name(rank, index))
                if _sums_of(read_json(target), record):
                    continue  # summed meanwhile (the assemble, a fault): the first sum stands
                write_json_atomic(target, checksums_json(record, crcs))
                wrote = True
        return wrote

    # ------------------------------------------------------------------ replication (thread)

    def _replicate_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(
                    lambda: self._stop.is_set() or self._wanted not in (None, self.replicated),
                    timeout=1.0,
                )
                wanted = self._wanted
            if self._stop.is_set() or wanted is None or wanted == self.replicated:
                continue
            try:
                if self.replicate(wanted):
                    self.replicated = wanted
                else:
                    self._stop.wait(TICK_S)
            except Exception:
                log.exception("memory holder %s: replication", self.node)
                self._stop.wait(TICK_S)

    def replicate(self, wanted: tuple[int, int]) -> bool:
        """Send every local rank's slot holding `wanted` (attempt, step) to the ring peers;
        whether every peer now holds it."""
        peers = self.peers
        if peers is None:
            return False
        local = {
            rank: slots
            for rank, slots in parse_slots(read_json_tree(self.path(SLOTS_DIR))).items()
            if slots.layout.attempt == wanted[0]
        }
        done = True
        for target in peers.targets(self.node):
            try:
                self._replicate_to(peers.endpoints[target], local, wanted)
            except PeerError as error:
                log.info("memory holder %s: step %s to %s: %s", self.node, wanted, target, error)
                done = False
        return done

    def _replicate_to(
        self, endpoint: str, local: Mapping[int, RankSlots], wanted: tuple[int, int]
    ) -> None:
        folder = f"{HELD_DIR}/{self.node}/{SLOTS_DIR}"
        held = parse_slots(
            {k.rsplit("/", 1)[-1]: v for k, v in catalog(endpoint, self.token, folder).items()}
        )
        for rank, slots in sorted(local.items()):
            source = next(
                (i for i, r in slots.checksummed().items() if (r.attempt, r.step) == wanted), None
            )
            if source is None:
                raise PeerError(f"rank {rank} no longer holds step {wanted[1]}: a newer one came")
            record, layout = slots.records[source], slots.layout
            there = held.get(rank)
            records: dict[int, SlotRecord | None] = {}
            if there is None or there.layout.digest != layout.digest:
                text = json.dumps(layout.to_json(), separators=(",", ":")).encode()
                put_bytes(
                    endpoint, self.token, f"{folder}/{layout_name(rank)}", text, self.bandwidth
                )
            else:
                records = dict(there.records)
            target = replication_target(records, record)
            if target is None:
                continue
            put_slot(
                endpoint,
                self.token,
                f"{folder}/{slot_name(rank, target)}",
                self.path(SLOTS_DIR, slot_name(rank, source)),
                record_json(record),
                spans(layout),
                list(slots.checksums[source].crcs),
                self.bandwidth,
            )

    # ------------------------------------------------------------------ garbage collection

    def _collect_garbage(self, ranks: Mapping[int, RankSlots], peers: PeerSet) -> None:
        newest = max((slots.layout.attempt for slots in ranks.values()), default=-1)
        ready = newest > self._floor and _ready(ranks)  # the configured attempt saves
        attempts = {rank: slots.layout.attempt for rank, slots in ranks.items()}
        for rank in stale_ranks(attempts, ready):
            self._drop_rank(self.path(SLOTS_DIR), rank)
        held = self.path(HELD_DIR)
        sources = sorted(os.listdir(held)) if os.path.isdir(held) else []
        for source in held_nodes_to_drop(sources, peers.sources(self.node), ready):
            shutil.rmtree(os.path.join(held, source), ignore_errors=True)
            log.info("memory holder %s: dropped the replicas of %s", self.node, source)
        for source in sources:
            folder = os.path.join(held, source, SLOTS_DIR)
            theirs = parse_slots(read_json_tree(folder, self._cache))
            old = {rank: slots.layout.attempt for rank, slots in theirs.items()}
            for rank in stale_ranks(old, _ready(theirs)):
                self._drop_rank(folder, rank)

    @staticmethod
    def _drop_rank(folder: str, rank: int) -> None:
        names = [layout_name(rank)]
        for index in range(SLOT_COUNT):
            names += [slot_name(rank, index), record_name(rank, index), checksums_name(rank, index)]
        for name in names[::-1]:  # records before slots, the layout last
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ restore (the agent)

    def assemble(self) -> Assembly:
        """Choose the step the attempt just configured restores and write
        ``restore/index.json`` (none when no step is whole) and ``restore/status.json``.
        Call with no worker of this node running (before torchrun starts)."""
        with self._lock:
            peers = self.peers or PeerSet(0, {}, 0)
            self._checksum(self._own_slots())  # what the last workers wrote just before dying
            return assemble(self.root, self.node, peers.endpoints, self.token)

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.server.close()
