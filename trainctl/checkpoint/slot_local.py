"""A restore without a holder (one process, tests, benchmarks): `local_restore_index` builds the
`RestoreIndex` of a node directory from its own slot records (`trainctl.checkpoint.slots`
writes them)."""

from __future__ import annotations

import os

from trainctl.checkpoint.slot_catalog import slot_crcs, spans
from trainctl.checkpoint.slot_layout import (
    SLOT_COUNT,
    SLOTS_DIR,
    Layout,
    RankCopy,
    RestoreIndex,
    SlotChecksums,
    SlotRecord,
    Source,
    checksums_name,
    read_json,
    record_name,
    slot_name,
)


def _slot_copies(directory: str, layout: Layout) -> dict[int, int]:
    """Step -> slot of rank `layout.rank`'s records that belong to `layout` (newest attempt's
    step wins a tie)."""
    found: dict[int, tuple[int, int]] = {}
    for slot in range(SLOT_COUNT):  # every slot there may be, one or two
        path = os.path.join(directory, record_name(layout.rank, slot))
        record = SlotRecord.from_json(read_json(path))
        if record is None or record.layout != layout.digest:
            continue
        if os.path.getsize(os.path.join(directory, slot_name(layout.rank, slot))) < layout.nbytes:
            continue
        if record.step not in found or found[record.step][0] < record.attempt:
            found[record.step] = (record.attempt, slot)
    return {step: slot for step, (_, slot) in found.items()}


def _crcs_of(directory: str, layout: Layout, slot: int, step: int) -> tuple[str, ...]:
    """The holder's CRCs of the slot when they are of this step and layout, else summed now."""
    sums = SlotChecksums.from_json(
        read_json(os.path.join(directory, checksums_name(layout.rank, slot)))
    )
    if sums is not None and sums.step == step and sums.layout == layout.digest:
        return sums.crcs
    return tuple(slot_crcs(os.path.join(directory, slot_name(layout.rank, slot)), spans(layout)))


def local_restore_index(node_root: str) -> RestoreIndex | str:
    """The newest step every rank of the node's layouts has a slot of, as a `RestoreIndex` over
    the local slot files (tier ``memory``), or why there is none. Without a holder only: its
    CRCs are the holder's when present, else summed here (then they check nothing)."""
    directory = os.path.join(node_root, SLOTS_DIR)
    layouts: dict[int, Layout] = {}
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        if name.endswith(".layout.json"):
            value = read_json(os.path.join(directory, name))
            if isinstance(value, dict):
                layout = Layout.from_json(value)
                layouts[layout.rank] = layout
    if not layouts:
        return "no slot layout on this node"
    sizes = {layout.world_size for layout in layouts.values()}
    world_size = max(sizes)
    missing = sorted(set(range(world_size)) - set(layouts))
    if len(sizes) != 1 or missing:
        return f"ranks {missing} of the {world_size} have no slots on this node"
    copies = {rank: _slot_copies(directory, layout) for rank, layout in layouts.items()}
    common = set.intersection(*(set(steps) for steps in copies.values()))
    if not common:
        return "no step has a complete slot on every rank"
    step = max(common)
    ranks = []
    for rank in range(world_size):
        layout, slot = layouts[rank], copies[rank][step]
        path = os.path.join(directory, slot_name(rank, slot))
        source = Source(path=path, kind="own")
        ranks.append(RankCopy(layout, source, _crcs_of(directory, layout, slot, step)))
    return RestoreIndex(step=step, tier="memory", ranks=tuple(ranks))
