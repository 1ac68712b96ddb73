"""What a memory-tier holder knows of its attempt and its peers (`PeerSet`, `Known`), the pure
rules it reads its folders by, and how it drops a rank's files (`trainctl.checkpoint.holder`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from trainctl.checkpoint.memory import ring_peers
from trainctl.checkpoint.slot_catalog import RankSlots
from trainctl.checkpoint.slot_layout import (
    SLOT_COUNT,
    SlotChecksums,
    SlotRecord,
    checksums_name,
    layout_name,
    record_name,
    slot_name,
)


@dataclasses.dataclass
class Known:
    """What a sender knows one peer holds of its ranks: each rank's layout digest and the
    records of its held slots (from a catalog, then updated by every put that succeeded)."""

    at: float
    ranks: dict[int, tuple[str, dict[int, SlotRecord | None]]]


@dataclasses.dataclass(frozen=True)
class PeerSet:
    """The holders of one attempt: its nodes in plan order and their endpoints (host:port)."""

    attempt: int
    endpoints: dict[str, str]
    replicas: int
    slots: int = SLOT_COUNT
    """Slots per copy (``checkpoint.memory.slots``): the held slots per rank here too."""

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


def sums_of(value: object, record: SlotRecord) -> SlotChecksums | None:
    """The checksums document `value` when it is that of the slot holding `record`."""
    sums = SlotChecksums.from_json(value)
    if sums is None or (sums.step, sums.layout) != (record.step, record.layout):
        return None
    return sums


def newest_attempt(ranks: Mapping[int, RankSlots]) -> dict[int, RankSlots]:
    """The ranks whose layout belongs to the newest attempt among `ranks`."""
    if not ranks:
        return {}
    newest = max(slots.layout.attempt for slots in ranks.values())
    return {rank: slots for rank, slots in ranks.items() if slots.layout.attempt == newest}


def all_recorded(ranks: Mapping[int, RankSlots]) -> bool:
    """Whether every rank of the newest attempt has a recorded slot of that attempt."""
    newest = newest_attempt(ranks)
    return bool(newest) and all(
        any(r.attempt == slots.layout.attempt for r in slots.records.values())
        for slots in newest.values()
    )


def drop_rank(folder: str, rank: int) -> None:
    """Remove rank `rank`'s files from `folder`: records before slots, the layout last."""
    names = [layout_name(rank)]
    for index in range(SLOT_COUNT):
        names += [slot_name(rank, index), record_name(rank, index), checksums_name(rank, index)]
    for name in names[::-1]:  # records before slots, the layout last
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
