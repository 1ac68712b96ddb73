"""A node's memory-tier holder: checksums its ranks' slots, replicates the newest whole step to
its ring peers and chooses the step a relaunch restores (`trainctl.checkpoint.memory` has the
design, `trainctl.checkpoint.slot_layout` the files).

It runs inside the node agent (a server thread, a tick thread and a replication thread), so
it outlives the workers and dies with the node. `configure` gives it the attempt's holders;
`tick` (nearly free when no folder changed; at the end of the replication round's duty pause,
at least every `TICK_S`, every `FULL_LOOK_S` without ring peers: `tick_delay`) hands the newest
step every local rank has recorded to the replication thread and drops what an older attempt or
a node no longer in the attempt left. The replication thread sums (CRC) only the step it is
about to send (over mappings kept between rounds; discarding the sums when the record changed
meanwhile: the worker rewrote the slot), sends it to each peer (trusting what its own puts left
there, with a catalog of the peer at least every `RECATALOG_S`), and then rests so that its work
stays under `DUTY` of one core: steps that came meanwhile are skipped, only the newest is sent
next. A step never summed here (the newest own one, at a worker
kill) is summed by `assemble` (the agent, before torchrun starts), which writes
``restore/index.json`` (`trainctl.checkpoint.slot_assemble`). Its pacing is in `holder_pace`,
what it knows of its peers and the pure rules it reads folders by in `holder_peers`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping

from trainctl.checkpoint.holder_pace import (
    BANDWIDTH,
    DUTY,
    FRESH_S,
    FULL_LOOK_S,
    RECATALOG_S,
    TICK_S,
    pause_after,
    tick_delay,
)
from trainctl.checkpoint.holder_peers import (
    Known,
    PeerSet,
    all_recorded,
    drop_rank,
    newest_attempt,
    sums_of,
)
from trainctl.checkpoint.layout import MEMORY_BASE, node_memory_root
from trainctl.checkpoint.memory import (
    held_nodes_to_drop,
    newest_replicable,
    replication_target,
    stale_ranks,
)
from trainctl.checkpoint.peer_wire import PeerError, PeerServer, catalog, put_bytes
from trainctl.checkpoint.slot_assemble import STATUS_NAME, Assembly, assemble
from trainctl.checkpoint.slot_catalog import (
    JsonCache,
    MappedSlots,
    RankSlots,
    checksums_json,
    folders_stamp,
    parse_slots,
    read_json_tree,
    record_json,
    spans,
)
from trainctl.checkpoint.slot_layout import (
    HELD_DIR,
    SLOTS_DIR,
    SlotRecord,
    checksums_name,
    layout_name,
    read_json,
    record_name,
    slot_name,
    write_json_atomic,
)
from trainctl.checkpoint.slot_permit import PermitWriter, Rewritten, sending
from trainctl.checkpoint.slot_wire import put_slot

__all__ = [
    "FULL_LOOK_S",
    "STATUS_NAME",
    "TICK_S",
    "Assembly",
    "Holder",
    "PeerSet",
    "pause_after",
    "tick_delay",
]

log = logging.getLogger(__name__)


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
        duty: float = DUTY,
    ) -> None:
        self.node = node
        self.root = node_memory_root(job_id, node, base)
        self.token = token
        self.bandwidth = bandwidth
        self.duty = duty
        self.peers: PeerSet | None = None
        self.replicated: tuple[int, int] | None = None
        """The (attempt, step) last replicated to every ring peer."""
        self._lock = threading.Lock()
        self._cache = JsonCache()
        self._sender_cache = JsonCache()  # the replication thread's: a JsonCache is not shared
        self._known: dict[str, Known] = {}
        self._maps = MappedSlots()  # the replication thread's: the own slots it sums
        """Endpoint -> what this holder's puts left there (the replication thread's)."""
        self._looked: tuple[object, ...] | None = None
        """What the last full tick saw (`_folders_key`), None: look again."""
        self._looked_at = 0.0
        self._wanted: tuple[int, int] | None = None
        self._resting_until = 0.0
        """When the replication thread's duty pause ends (`time.monotonic`)."""
        self._floor = -1
        """The newest attempt whose layouts were here when the attempt was configured: ranks of
        a newer one are the configured attempt's workers."""
        self._failed_rounds = 0
        self._apart = False
        """Whether the local ranks' records hold no common step (one slot: they skipped apart,
        or one was killed mid-save)."""
        self._permit = PermitWriter(self.path(SLOTS_DIR))
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
            self._known = {}  # a new attempt: ask every peer what it holds
            self._floor = max((s.layout.attempt for s in self._own_slots().values()), default=-1)
            # The new ring peers may not hold what the old ones did: replicate again first.
            self.replicated, self._failed_rounds, self._apart = None, 0, False
            self._publish()
            if not self._stop.is_set():
                for thread in self._threads:
                    if not thread.is_alive():
                        thread.start()

    # ------------------------------------------------------------------ ticks (thread)

    def _loop(self) -> None:
        while not self._stop.wait(self._tick_delay()):
            try:
                self.tick()
            except Exception:  # the tier is an optimisation: never kill the agent for it
                log.exception("memory holder %s", self.node)

    def _tick_delay(self) -> float:
        peers = self.peers
        replicating = peers is not None and bool(peers.targets(self.node))
        return tick_delay(time.monotonic(), self._resting_until, replicating)

    def tick(self) -> None:
        """One pass: hand the newest step every local rank recorded to replication, drop what
        is no longer needed; nothing but a few `stat` calls when no folder changed."""
        with self._lock:
            peers = self.peers
            if peers is None or self.node not in peers.endpoints:
                return
            now = time.monotonic()
            looked = self._folders_key(peers)
            recent = now - self._looked_at < FULL_LOOK_S
            if recent and looked is not None and looked == self._looked:
                return
            ranks = self._own_slots()
            local = newest_attempt(ranks)
            wanted = newest_replicable(
                {
                    rank: [(r.attempt, r.step) for r in slots.records.values()]
                    for rank, slots in local.items()
                }
            )
            if wanted is not None and wanted != self._wanted and peers.targets(self.node):
                with self._wake:
                    self._wanted = wanted
                    self._wake.notify()
            # Nothing to replicate while some rank holds a step (ranks skipped apart, or one was
            # killed mid-save): single-slot workers must not wait for it.
            apart = wanted is None and any(slots.records for slots in local.values())
            if apart != self._apart:
                self._apart = apart
                self._publish()
            self._collect_garbage(ranks, peers)
            self._looked, self._looked_at = looked, now

    def _folders_key(self, peers: PeerSet) -> tuple[object, ...] | None:
        """What a tick reads (`folders_stamp` of its folders) for the attempt `peers`."""
        held = self.path(HELD_DIR)
        try:
            sources = sorted(os.listdir(held))
        except OSError:
            sources = []
        folders = [self.path(SLOTS_DIR), held]
        folders += [os.path.join(held, source, SLOTS_DIR) for source in sources]
        stamp = folders_stamp(folders, FRESH_S)
        return None if stamp is None else (id(peers), *stamp)

    def _own_slots(self, cache: JsonCache | None = None) -> dict[int, RankSlots]:
        return parse_slots(read_json_tree(self.path(SLOTS_DIR), cache or self._cache))

    def checksum(self, wanted: tuple[int, int]) -> dict[int, tuple[int, tuple[str, ...]]] | None:
        """Every local rank's slot holding `wanted` (attempt, step) and its CRCs (rank -> (slot
        index, CRCs)): the ones recorded, else summed now and written next to the record;
        None when a rank no longer holds that step (a newer one came, or the worker rewrote the
        slot while it was summed)."""
        found: dict[int, tuple[int, tuple[str, ...]]] = {}
        for rank, slots in sorted(self._own_slots(self._sender_cache).items()):
            if slots.layout.attempt != wanted[0]:
                continue
            index = next(
                (i for i, r in slots.records.items() if (r.attempt, r.step) == wanted), None
            )
            if index is None:
                return None
            sums = slots.checksums.get(index)
            crcs = sums.crcs if sums is not None else self._sum(rank, index, slots)
            if crcs is None:
                return None
            found[rank] = (index, tuple(crcs))
        return found

    def _sum(self, rank: int, index: int, slots: RankSlots) -> tuple[str, ...] | None:
        """Sum slot `index` of `rank` and write its checksums; None when its record changed
        meanwhile (the worker rewrote the slot) or the slot is unreadable."""
        record = slots.records[index]
        try:
            crcs = self._maps.crcs(
                self.path(SLOTS_DIR, slot_name(rank, index)), spans(slots.layout)
            )
        except OSError as error:
            log.debug("memory holder %s: %s", self.node, error)
            return None
        again = SlotRecord.from_json(read_json(self.path(SLOTS_DIR, record_name(rank, index))))
        if again != record:  # the worker rewrote the slot while it was summed
            return None
        target = self.path(SLOTS_DIR, checksums_name(rank, index))
        first = sums_of(read_json(target), record)
        if first is not None:  # summed meanwhile (the assemble, a fault): the first sum stands
            return first.crcs
        write_json_atomic(target, checksums_json(record, crcs))
        return tuple(crcs)

    # ------------------------------------------------------------------ replication (thread)

    def _replicate_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(
                    lambda: self._stop.is_set() or self._wanted not in (None, self.replicated),
                    timeout=1.0,
                )
                wanted = self._wanted
            self._maps.prune()  # a slot dropped or replaced meanwhile: its memory goes now
            if self._stop.is_set() or wanted is None or wanted == self.replicated:
                continue
            started = time.thread_time()  # CPU, not wall: bandwidth pauses and preemption
            done = False
            try:
                done = self.replicate(wanted)
            except Exception:
                log.exception("memory holder %s: replication", self.node)
            if done:
                self.replicated = wanted
            self._publish()
            # One round at a time, then rest: the work stays under `duty` of a core.
            pause = pause_after(time.thread_time() - started, self.duty, done)
            self._resting_until = time.monotonic() + pause
            self._stop.wait(pause)

    def replicate(self, wanted: tuple[int, int]) -> bool:
        """Sum and send every local rank's slot holding `wanted` (attempt, step) to the ring
        peers; whether every peer now holds it."""
        peers = self.peers
        if peers is None:
            return False
        sums = self.checksum(wanted)
        if not sums:
            return False
        local = {
            rank: slots
            for rank, slots in self._own_slots(self._sender_cache).items()
            if rank in sums
        }
        done, failed = True, False
        for target in peers.targets(self.node):
            endpoint = peers.endpoints[target]
            try:
                self._replicate_to(endpoint, local, sums, peers.slots)
            except Rewritten:
                return False
            except PeerError as error:
                self._known.pop(endpoint, None)  # what is there is unknown now: ask next time
                log.info("memory holder %s: step %s to %s: %s", self.node, wanted, target, error)
                done, failed = False, True
        self._failed_rounds = self._failed_rounds + 1 if failed else 0
        return done

    def _publish(self) -> None:
        """Tell single-slot workers what they may overwrite (`PermitWriter`)."""
        peers = self.peers
        if peers is not None and peers.slots == 1:
            has_targets = bool(peers.targets(self.node))
            self._permit.publish(self.replicated, has_targets, self._failed_rounds, self._apart)

    def _replicate_to(
        self,
        endpoint: str,
        local: Mapping[int, RankSlots],
        sums: Mapping[int, tuple[int, tuple[str, ...]]],
        count: int,
    ) -> None:
        folder = f"{HELD_DIR}/{self.node}/{SLOTS_DIR}"
        known = self._known_at(endpoint, folder)
        for rank, slots in sorted(local.items()):
            source, crcs = sums[rank]
            record, layout = slots.records.get(source), slots.layout
            if record is None:
                raise PeerError(f"rank {rank}: slot {source} was rewritten: a newer step came")
            digest, records = known.ranks.get(rank, ("", {}))
            if digest != slots.digest:
                text = json.dumps(layout.to_json(), separators=(",", ":")).encode()
                put_bytes(
                    endpoint, self.token, f"{folder}/{layout_name(rank)}", text, self.bandwidth
                )
                records = {}
                known.ranks[rank] = (slots.digest, records)
            target = replication_target(records, record, count)
            if target is None:
                continue
            with sending(self.path(SLOTS_DIR), rank, source, record) as path:
                records[target] = None  # the put removes its record first
                put_slot(
                    endpoint,
                    self.token,
                    f"{folder}/{slot_name(rank, target)}",
                    path,
                    record_json(record),
                    spans(layout),
                    list(crcs),
                    self.bandwidth,
                )
            records[target] = record

    def _known_at(self, endpoint: str, folder: str) -> Known:
        """What the peer at `endpoint` holds of this node's ranks: remembered from this
        holder's own puts, or from a catalog request when that is older than `RECATALOG_S`
        (or was lost with a failed put)."""
        now = time.monotonic()
        known = self._known.get(endpoint)
        if known is None or now - known.at >= RECATALOG_S:
            docs = catalog(endpoint, self.token, folder)
            held = parse_slots({k.rsplit("/", 1)[-1]: v for k, v in docs.items()})
            ranks = {
                rank: (there.digest, dict[int, SlotRecord | None](there.records))
                for rank, there in held.items()
            }
            known = self._known[endpoint] = Known(now, ranks)
        return known

    # ------------------------------------------------------------------ garbage collection

    def _collect_garbage(self, ranks: Mapping[int, RankSlots], peers: PeerSet) -> None:
        newest = max((slots.layout.attempt for slots in ranks.values()), default=-1)
        ready = newest > self._floor and all_recorded(ranks)  # the configured attempt saves
        attempts = {rank: slots.layout.attempt for rank, slots in ranks.items()}
        for rank in stale_ranks(attempts, ready):
            drop_rank(self.path(SLOTS_DIR), rank)
        held = self.path(HELD_DIR)
        sources = sorted(os.listdir(held)) if os.path.isdir(held) else []
        for source in held_nodes_to_drop(sources, peers.sources(self.node), ready):
            shutil.rmtree(os.path.join(held, source), ignore_errors=True)
            log.info("memory holder %s: dropped the replicas of %s", self.node, source)
        for source in sources:
            folder = os.path.join(held, source, SLOTS_DIR)
            theirs = parse_slots(read_json_tree(folder, self._cache))
            old = {rank: slots.layout.attempt for rank, slots in theirs.items()}
            for rank in stale_ranks(old, all_recorded(theirs)):
                drop_rank(folder, rank)
        self.server.held_maps.prune()  # a dropped held slot's pages go with its mapping

    # ------------------------------------------------------------------ restore (the agent)

    def assemble(self) -> Assembly:
        """Choose the step the attempt just configured restores and write
        ``restore/index.json`` (none when no step is whole) and ``restore/status.json``.
        Call with no worker of this node running (before torchrun starts)."""
        with self._lock:
            peers = self.peers or PeerSet(0, {}, 0)
            # An own slot never summed (its step was not replicated) is summed there, once,
            # and its CRCs guard the workers' reads.
            return assemble(self.root, self.node, peers.endpoints, self.token)

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self._maps.close()
        self.server.close()
