"""The memory tier's slot writer: each rank copies its state into a fixed, mmap'd slot file.

The first memory save of an attempt flattens the rank's state dict as DCP does, plans it with
DCP's own planner helper (`create_default_local_save_plan`: one write item per stored chunk,
with its fqn, chunk offsets and sizes, global size and dtype), lays the chunks out 64-byte
aligned in a `Layout` (non-tensor values: one pickled ``objects`` entry with fixed headroom),
writes ``slots/rank-R.layout.json`` once, preallocates `SLOT_COUNT` slot files of
``Layout.nbytes`` (``posix_fallocate``: a full tmpfs fails here, not with a SIGBUS later) and
mmaps them. Every save then: remove the target slot's record, copy every tensor into its view of
the slot (one ``torch._foreach_copy_``), pickle the objects, write the record. Slots alternate,
so the newest complete copy is never the one being written. No collective and no checksum here:
the node's holder sums each new record's slot in the background.

`local_restore_index` builds the `RestoreIndex` of a node directory from its own slot records,
for a restore without a holder (one process, tests).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pickle
import struct
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from trainctl.checkpoint.slot_catalog import slot_crcs, spans, sum_entries
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
    layout_name,
    read_json,
    record_name,
    slot_name,
    write_json_atomic,
)

ALIGN = 64
TENSOR = "tensor"
OBJECTS = "objects"
OBJECTS_HEADER = struct.Struct("<Q")
"""An ``objects`` entry: the payload's length, then the pickled {fqn: value} of every
non-tensor item."""
OBJECTS_HEADROOM = 4096
"""Spare bytes in the ``objects`` entry, so a value that grows a little (a learning rate's repr)
does not force a new layout."""


class SlotError(RuntimeError):
    """The state cannot be laid out in a slot (an unsupported item)."""


def align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _state_dict_of(value: Any) -> Any:
    """A Stateful's state dict: its `live_state_dict` when it has one (a cached dict over the
    live tensors, `trainctl.runtime.checkpoint.ModelAndOptimizer`), else `state_dict`."""
    live = getattr(value, "live_state_dict", None)
    return live() if callable(live) else value.state_dict()


def flatten(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` (Statefuls expanded) flattened to DCP's fqns, as DCP's planners flatten it."""
    state_dict = {
        key: _state_dict_of(value) if isinstance(value, Stateful) else value
        for key, value in state.items()
    }
    flat, _ = flatten_state_dict(state_dict)
    return flat


def local_tensor(value: Any) -> torch.Tensor:
    """The tensor a rank stores for a flat item (a DTensor: its local shard)."""
    return value._local_tensor if isinstance(value, DTensor) else value


def objects_payload(flat: Mapping[str, Any]) -> bytes:
    """The pickled non-tensor items of `flat` ({fqn: value}, fqn order)."""
    values = {fqn: value for fqn, value in flat.items() if not isinstance(value, torch.Tensor)}
    return pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


def plan_layout(flat: Mapping[str, Any], rank: int, world_size: int, attempt: int) -> Layout:
    """Where each stored chunk of `flat` goes in a slot (pure: DCP's planner, then offsets)."""
    plan = create_default_local_save_plan(dict(flat), True)
    entries: list[dict[str, Any]] = []
    objects: list[str] = []
    offset = 0
    for item in plan.items:
        if item.type == WriteItemType.BYTE_IO:
            objects.append(item.index.fqn)
            continue
        value = flat[item.index.fqn]
        if not isinstance(value, torch.Tensor) or item.tensor_data is None:
            raise SlotError(f"{item.index.fqn}: {type(value).__name__} is not supported in slots")
        tensor = local_tensor(value)
        chunk = item.tensor_data.chunk
        if tuple(chunk.sizes) != tuple(tensor.shape):
            raise SlotError(f"{item.index.fqn}: a rank holding several chunks is not supported")
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            {
                "fqn": item.index.fqn,
                "kind": TENSOR,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "global_size": list(item.tensor_data.size),
                "chunk_offsets": list(chunk.offsets),
                "chunk_sizes": list(chunk.sizes),
                "offset": offset,
                "nbytes": nbytes,
            }
        )
        offset = align(offset + nbytes)
    payload = OBJECTS_HEADER.size + len(objects_payload(flat))
    capacity = align(max(2 * payload, payload + OBJECTS_HEADROOM))
    entries.append(
        {"fqn": "", "kind": OBJECTS, "fqns": objects, "offset": offset, "nbytes": capacity}
    )
    return Layout(rank, world_size, attempt, offset + capacity, tuple(entries))


def entry_crcs(buffer: Any, layout: Layout) -> tuple[str, ...]:
    """`entry_sum` (8 hex digits) of every entry of `layout` in `buffer` (a slot's bytes)."""
    return tuple(sum_entries(buffer, spans(layout)))


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SlotError(f"unknown dtype {name!r} in a slot layout")
    return dtype


def entry_view(slot: torch.Tensor, entry: Mapping[str, Any]) -> torch.Tensor:
    """The tensor entry `entry` as a tensor over `slot` (a flat uint8 tensor of the slot)."""
    dtype = dtype_of(str(entry["dtype"]))
    sizes = tuple(int(size) for size in entry["chunk_sizes"])
    if int(entry["nbytes"]) == 0:
        return torch.empty(sizes, dtype=dtype)
    raw = slot.narrow(0, int(entry["offset"]), int(entry["nbytes"]))
    return raw.view(dtype).view(sizes)


class _Slot:
    """One preallocated, mmap'd slot file and the views of its tensor entries."""

    def __init__(self, path: str, layout: Layout) -> None:
        self.path = path
        try:
            reuse = os.path.getsize(path) == layout.nbytes
        except OSError:
            reuse = False
        # A file of another size is replaced by a new one, never truncated in place: the holder
        # may have the old one mapped while it sums it (a shrunk mapping faults with SIGBUS).
        target = path if reuse else f"{path}.new"
        handle = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not reuse:
                os.ftruncate(handle, layout.nbytes)
            os.posix_fallocate(handle, 0, layout.nbytes)  # ENOSPC now, never a SIGBUS later
            self.map = mmap.mmap(handle, layout.nbytes)
        except OSError:
            if not reuse:
                os.unlink(target)
            raise
        finally:
            os.close(handle)
        if not reuse:
            os.replace(target, path)
        self.flat = torch.frombuffer(self.map, dtype=torch.uint8)
        self.views = [entry_view(self.flat, e) for e in layout.entries if e["kind"] == TENSOR]

    def write_objects(self, entry: Mapping[str, Any], payload: bytes) -> None:
        start = int(entry["offset"])
        OBJECTS_HEADER.pack_into(self.map, start, len(payload))
        body = start + OBJECTS_HEADER.size
        self.map[body : body + len(payload)] = payload

    def close(self) -> None:
        self.views = []
        del self.flat
        try:
            self.map.close()
        except BufferError:  # a view still exported: the mapping goes with it
            pass


def newest_record_slot(directory: str, rank: int) -> int | None:
    """The slot whose record holds the newest step (None: no record)."""
    steps = {}
    for slot in range(SLOT_COUNT):
        record = SlotRecord.from_json(read_json(os.path.join(directory, record_name(rank, slot))))
        if record is not None:
            steps[slot] = (record.attempt, record.step)
    return max(steps, key=lambda slot: steps[slot]) if steps else None


class SlotWriter:
    """Rank `rank`'s slots under ``<node_root>/slots/``: `save` copies a state into the next one.

    Not thread-safe; call from the training thread. The first `save` (and a save whose state no
    longer fits the layout) writes the layout and allocates the slot files."""

    def __init__(self, node_root: str, rank: int, world_size: int, attempt: int) -> None:
        self.directory = os.path.join(node_root, SLOTS_DIR)
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.layout: Layout | None = None
        self._slots: list[_Slot] = []
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._fqns: list[str] = []
        self._objects: list[str] = []
        self._digest = ""
        newest = newest_record_slot(self.directory, rank)
        self._next = 0 if newest is None else (newest + 1) % SLOT_COUNT

    def record_path(self, slot: int) -> str:
        return os.path.join(self.directory, record_name(self.rank, slot))

    def save(self, step: int, flat: Mapping[str, Any]) -> int:
        """Copy `flat` (`flatten`'s output) into the next slot as `step`; returns the slot."""
        payload = objects_payload(flat)
        if not self._fits(flat, payload):
            self._lay_out(flat)
        assert self.layout is not None
        target = self._next
        slot = self._slots[target]
        try:
            os.unlink(self.record_path(target))  # a slot without a record is never read
        except FileNotFoundError:
            pass
        sources = [local_tensor(flat[fqn]) for fqn in self._fqns]
        views = slot.views
        if all(source.device.type == "cpu" for source in sources):
            torch._foreach_copy_(views, sources)
        else:
            for view, source in zip(views, sources, strict=True):
                view.copy_(source)  # device to host, synchronous into pageable memory
        slot.write_objects(self.layout.entries[-1], payload)
        record = SlotRecord(step, self.attempt, self._digest)  # digest: ms, once per layout
        write_json_atomic(self.record_path(target), dataclasses.asdict(record))
        self._next = (target + 1) % SLOT_COUNT
        return target

    def _fits(self, flat: Mapping[str, Any], payload: bytes) -> bool:
        if self.layout is None:
            return False
        capacity = int(self.layout.entries[-1]["nbytes"]) - OBJECTS_HEADER.size
        if len(payload) > capacity or len(flat) != len(self._shapes) + len(self._objects):
            return False
        for fqn, (shape, dtype) in self._shapes.items():
            value = flat.get(fqn)
            if not isinstance(value, torch.Tensor):
                return False
            tensor = local_tensor(value)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                return False
        return all(fqn in flat and not isinstance(flat[fqn], torch.Tensor) for fqn in self._objects)

    def _lay_out(self, flat: Mapping[str, Any]) -> None:
        """A new layout for `flat`: records of the old one first removed (they describe bytes
        laid out differently), the layout written, the slots (re)allocated."""
        layout = plan_layout(flat, self.rank, self.world_size, self.attempt)
        os.makedirs(self.directory, exist_ok=True)
        for slot in range(SLOT_COUNT):
            try:
                os.unlink(self.record_path(slot))
            except FileNotFoundError:
                pass
        self.close()
        write_json_atomic(os.path.join(self.directory, layout_name(self.rank)), layout.to_json())
        self._slots = [
            _Slot(os.path.join(self.directory, slot_name(self.rank, slot)), layout)
            for slot in range(SLOT_COUNT)
        ]
        tensors = [e for e in layout.entries if e["kind"] == TENSOR]
        self._fqns = [str(e["fqn"]) for e in tensors]
        self._shapes = {
            fqn: (tuple(local_tensor(flat[fqn]).shape), local_tensor(flat[fqn]).dtype)
            for fqn in self._fqns
        }
        self._objects = [str(fqn) for fqn in layout.entries[-1]["fqns"]]
        self.layout = layout
        self._digest = layout.digest

    @property
    def next_slot(self) -> int:
        """The slot the next `save` writes."""
        return self._next

    @property
    def nbytes(self) -> int:
        """Bytes of one slot (0 before the first save)."""
        return self.layout.nbytes if self.layout is not None else 0

    def close(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots = []


def _slot_copies(directory: str, layout: Layout) -> dict[int, int]:
    """Step -> slot of rank `layout.rank`'s records that belong to `layout` (newest attempt's
    step wins a tie)."""
    found: dict[int, tuple[int, int]] = {}
    for slot in range(SLOT_COUNT):
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
