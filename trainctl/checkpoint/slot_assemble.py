"""Choosing the step a relaunch restores from the memory tier, and where each rank's copy is
(`trainctl.checkpoint.memory` has the design): the holder's `assemble`, before torchrun starts.

Every slot copy this node and the reachable peers hold is listed (their JSON documents, one
``catalog`` request per folder per peer), `memory.restore_candidates` orders the steps that
every rank of their attempt has a copy of, and the copies are verified best first — a local
one by summing it here, a peer's by asking that peer to sum it (``checksum``: the bytes do not
move) — against the CRCs the holders recorded. The first step whose every rank has a copy that
verifies is written to ``restore/index.json``; no data is copied: the workers read local slots
in place and remote ones by range, with the read token their agent gave them in a 0600 file
(the index holds no secret: any reader of the node's tmpfs may see it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainctl.checkpoint.memory import (
    OWN_SOURCE,
    REPLICA_SOURCE,
    RestoreCandidate,
    SlotCopy,
    restore_candidates,
    restore_tier_of,
)
from trainctl.checkpoint.peer_wire import PeerError, catalog, remote_crcs
from trainctl.checkpoint.slot_catalog import (
    RankSlots,
    checksums_json,
    parse_slots,
    read_json_tree,
    slot_crcs,
    spans,
)
from trainctl.checkpoint.slot_layout import (
    HELD_DIR,
    INDEX_NAME,
    RESTORE_DIR,
    SLOTS_DIR,
    Layout,
    RankCopy,
    RestoreIndex,
    SlotRecord,
    Source,
    slot_name,
    write_json_atomic,
)

STATUS_NAME = "status.json"
"""``restore/status.json``: which step was chosen, its tier, how long it took, what was skipped."""
VERIFY_THREADS = 8
"""Ranks verified at once (the sum releases the GIL; a peer sums its copies in parallel too)."""


@dataclasses.dataclass(frozen=True)
class Assembly:
    """What `assemble` chose: the step (None: none, the workers restore durable storage), its
    attempt and tier, seconds, and every copy or step it skipped, with why."""

    step: int | None
    tier: str | None
    seconds: float
    skipped: tuple[str, ...]
    attempt: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Found:
    """What is known about one copy: its layout and the CRCs recorded for it (None: the copy's
    holder never summed it, an own slot whose record came just before the crash)."""

    layout: Layout
    recorded: tuple[str, ...] | None


class _Copies:
    """Every copy of every rank's slot seen here and at the reachable peers."""

    def __init__(self, root: str, node: str, endpoints: Mapping[str, str], token: str) -> None:
        self.root = root
        self.node = node
        self.endpoints = dict(endpoints)
        self.token = token
        self.copies: list[SlotCopy] = []
        self.found: dict[tuple[str, str], _Found] = {}
        self.unreachable: list[str] = []

    def gather(self) -> None:
        self._add(self.node, True, read_json_tree(os.path.join(self.root, SLOTS_DIR)), None)
        self._add(self.node, True, read_json_tree(os.path.join(self.root, HELD_DIR)), HELD_DIR)
        for peer, endpoint in self.endpoints.items():
            if peer == self.node:
                continue
            try:
                own = catalog(endpoint, self.token, SLOTS_DIR)
                held = catalog(endpoint, self.token, HELD_DIR)
            except PeerError as error:
                self.unreachable.append(f"memory tier: peer {peer} unreachable: {error}")
                continue
            self._add(peer, False, own, None)
            self._add(peer, False, held, HELD_DIR)

    def _add(self, node: str, local: bool, docs: Mapping[str, Any], held: str | None) -> None:
        if held is None:
            self._add_folder(node, local, parse_slots(docs), SLOTS_DIR, OWN_SOURCE)
            return
        sources: dict[str, dict[str, Any]] = {}
        for name, value in docs.items():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == SLOTS_DIR:
                sources.setdefault(parts[0], {})[parts[2]] = value
        for source, folder in sorted(sources.items()):
            where = f"{held}/{source}/{SLOTS_DIR}"
            self._add_folder(node, local, parse_slots(folder), where, REPLICA_SOURCE)

    def _add_folder(
        self, node: str, local: bool, ranks: Mapping[int, RankSlots], folder: str, kind: str
    ) -> None:
        for rank, slots in sorted(ranks.items()):
            for index, record in sorted(slots.records.items()):
                location = f"{folder}/{slot_name(rank, index)}"
                sums = slots.checksums.get(index)
                if sums is None and kind == REPLICA_SOURCE:
                    continue  # a replica's record is written after its checksums: torn
                self.copies.append(
                    SlotCopy(
                        rank,
                        record.attempt,
                        record.step,
                        slots.layout.world_size,
                        kind,
                        local,
                        node,
                        location,
                    )
                )
                self.found[(node, location)] = _Found(
                    slots.layout, sums.crcs if sums is not None else None
                )

    def verify(self, copy: SlotCopy) -> RankCopy | str:
        """The copy, with the CRCs it verified against, or why it cannot be used."""
        found = self.found[(copy.node, copy.location)]
        tier = "memory" if copy.kind == OWN_SOURCE else "peer"
        where = f"{tier} tier: {copy.node}:{copy.location} (step {copy.step})"
        entries = spans(found.layout)
        try:
            if copy.local:
                path = os.path.join(self.root, copy.location)
                fresh = slot_crcs(path, entries)
                source = Source(path=path, kind=copy.kind)
            else:
                endpoint = self.endpoints[copy.node]
                fresh = remote_crcs(endpoint, self.token, copy.location, entries)
                source = Source(endpoint=endpoint, relative=copy.location, kind=copy.kind)
        except (OSError, ValueError) as error:
            return f"{where}: unreadable: {error}"
        if found.recorded is None:  # never summed: these CRCs guard the read from now on
            if copy.local:
                self._record_crcs(copy, fresh)
            return RankCopy(found.layout, source, tuple(fresh))
        for i, (have, want) in enumerate(zip(fresh, found.recorded, strict=True)):
            if have != want:
                fqn = found.layout.entries[i].get("fqn", f"#{i}")
                return f"{where}: entry {i} ({fqn}) fails its checksum ({have} != {want})"
        return RankCopy(found.layout, source, found.recorded)

    def _record_crcs(self, copy: SlotCopy, crcs: list[str]) -> None:
        path = os.path.join(self.root, f"{copy.location}.json")
        try:
            with open(path) as file:
                record = SlotRecord.from_json(json.load(file))
            if record is None:
                return
            sums = checksums_json(record, crcs)
            write_json_atomic(os.path.join(self.root, f"{copy.location}.crc.json"), sums)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the index carries the CRCs; the file is a convenience


def _pick(copies: _Copies, candidate: RestoreCandidate) -> tuple[list[RankCopy] | None, list[str]]:
    """Every rank's best copy of `candidate` that verifies (None when a rank has none), and
    the copies skipped on the way, in rank order."""

    def walk(held: tuple[SlotCopy, ...]) -> tuple[RankCopy | None, list[str]]:
        reasons: list[str] = []
        for copy in held:
            result = copies.verify(copy)
            if isinstance(result, RankCopy):
                return result, reasons
            reasons.append(result)
        return None, reasons

    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        results = list(pool.map(walk, candidate.copies))
    skipped = [reason for _copy, reasons in results for reason in reasons]
    picked = [copy for copy, _reasons in results]
    missing = [rank for rank, copy in enumerate(picked) if copy is None]
    if missing:
        skipped.append(
            f"memory step {candidate.step} (attempt {candidate.attempt}): no valid copy of "
            f"rank(s) {', '.join(map(str, missing[:8]))}"
        )
        return None, skipped
    return [copy for copy in picked if copy is not None], skipped


def assemble(root: str, node: str, endpoints: Mapping[str, str], token: str) -> Assembly:
    """Choose the step the next attempt restores and write ``restore/index.json`` (removed first:
    a stale index never survives) and ``restore/status.json`` (`Assembly`) under `root`, node
    `node`'s memory directory, looking at the holders at `endpoints` (node -> host:port) too."""
    started = time.perf_counter()
    folder = os.path.join(root, RESTORE_DIR)
    os.makedirs(folder, exist_ok=True)
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
        os.unlink(index_path)
    copies = _Copies(root, node, endpoints, token)
    copies.gather()
    candidates, passed = restore_candidates(copies.copies)
    skipped: list[str] = list(copies.unreachable)
    index: RestoreIndex | None = None
    chosen: RestoreCandidate | None = None
    for candidate in candidates:
        picked, reasons = _pick(copies, candidate)
        skipped += reasons
        if picked is not None:
            tier = restore_tier_of(copy.source.kind for copy in picked)
            index = RestoreIndex(candidate.step, tier, tuple(picked), tuple(skipped))
            chosen = candidate
            break
    if index is None:
        skipped = (
            passed + skipped
            if copies.copies
            else [*skipped, "no memory step on any reachable node"]
        )
    seconds = time.perf_counter() - started
    assembly = Assembly(
        index.step if index else None,
        index.tier if index else None,
        seconds,
        tuple(skipped),
        chosen.attempt if chosen else None,
    )
    if index is not None:
        index = dataclasses.replace(index, seconds=seconds)
        write_json_atomic(index_path, index.to_json())
    write_json_atomic(os.path.join(folder, STATUS_NAME), assembly.to_json())
    return assembly
