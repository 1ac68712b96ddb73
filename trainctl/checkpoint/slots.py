"""The memory tier's slot writer: each rank copies its state into a fixed, mmap'd slot file.

The first memory save of an attempt flattens the rank's state dict as DCP does, plans it with
DCP's own planner helper (`create_default_local_save_plan`: one write item per stored chunk,
with its fqn, chunk offsets and sizes, global size and dtype), lays the chunks out 64-byte
aligned in a `Layout` (non-tensor values: one pickled ``objects`` entry with fixed headroom),
writes ``slots/rank-R.layout.json`` once, preallocates its slot files (2, or 1: see
``checkpoint.memory.slots``) of ``Layout.nbytes`` (``posix_fallocate``: a full tmpfs fails here,
not with a SIGBUS later) and mmaps them. Every save then: remove the target slot's record, copy
every tensor into its view of the slot (one ``torch._foreach_copy_``), pickle the objects, write
the record. Two slots
alternate, so the newest complete copy is never the one being written; one slot (with replicas)
is rewritten only when the holder's `Permit` says its step is replicated (`may_overwrite`) and
no send of it is under way (the slot file's lock), else the save is skipped. No collective and
no checksum here: the node's holder sums each new record's slot in the background.

`trainctl.checkpoint.slot_local.local_restore_index` builds the `RestoreIndex` of a node
directory from its own slot records, for a restore without a holder (one process, tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import mmap
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from trainctl.checkpoint.memory import Permit, may_overwrite
from trainctl.checkpoint.slot_catalog import spans, sum_entries
from trainctl.checkpoint.slot_layout import (
    PERMIT_NAME,
    SLOT_COUNT,
    SLOTS_DIR,
    Layout,
    SlotRecord,
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


class PermitReader:
    """The holder's `Permit` in ``slots/replicated.json``: one ``stat`` per call, the file read
    again only when it was replaced (the holder writes it by a rename: a new inode)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, PERMIT_NAME)
        self._seen: tuple[int, int, int] | None = None
        self._permit: Permit | None = None

    def __call__(self) -> Permit | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:  # no holder writes one: nobody replicates
            self._seen = self._permit = None
            return None
        seen = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)  # an inode may be reused
        if seen != self._seen:
            self._seen, self._permit = seen, Permit.from_json(read_json(self.path))
        return self._permit


def newest_records(directory: str, rank: int, slots: int = SLOT_COUNT) -> dict[int, SlotRecord]:
    """Rank `rank`'s slot records among its first `slots` slots (slot -> record)."""
    found = {}
    for slot in range(slots):
        record = SlotRecord.from_json(read_json(os.path.join(directory, record_name(rank, slot))))
        if record is not None:
            found[slot] = record
    return found


def newest_record_slot(found: Mapping[int, SlotRecord]) -> int | None:
    """The slot whose record (`newest_records`) holds the newest step (None: no record)."""
    return max(found, key=lambda slot: (found[slot].attempt, found[slot].step)) if found else None


class SlotWriter:
    """Rank `rank`'s slots under ``<node_root>/slots/``: `save` copies a state into the next one.

    Not thread-safe; call from the training thread. The first `save` (and a save whose state no
    longer fits the layout) writes the layout and allocates the slot files. `slots`: 2
    (alternate) or 1; with one slot and `replicas`, a save may be skipped (`may_overwrite`)."""

    def __init__(
        self,
        node_root: str,
        rank: int,
        world_size: int,
        attempt: int,
        slots: int = SLOT_COUNT,
        replicas: int = 0,
    ) -> None:
        self.directory = os.path.join(node_root, SLOTS_DIR)
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.slots = slots
        self.replicas = replicas
        self.permit = PermitReader(self.directory)
        self.skipped = 0
        """Saves skipped: the slot's step was not replicated yet, or a holder was sending it."""
        self.skip_reason = ""
        """Why the last skipped save was skipped."""
        self.layout: Layout | None = None
        self._slots: list[_Slot] = []
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._fqns: list[str] = []
        self._objects: list[str] = []
        self._digest = ""
        records = newest_records(self.directory, rank, slots)
        newest = newest_record_slot(records)
        self._next = 0 if newest is None else (newest + 1) % slots
        self._held = None if newest is None else (records[newest].attempt, records[newest].step)
        """(attempt, step) of the newest copy this rank wrote (one slot: the one it holds)."""

    def record_path(self, slot: int) -> str:
        return os.path.join(self.directory, record_name(self.rank, slot))

    def save(self, step: int, flat: Mapping[str, Any]) -> int | None:
        """Copy `flat` (`flatten`'s output) into the next slot as `step`; returns the slot, or
        None when the save was skipped (one slot: see the class)."""
        guarded = self.slots == 1 and self.replicas > 0  # else no stat: nothing to wait for
        if guarded and not may_overwrite(self._held, self.permit(), self.replicas, self.slots):
            held = self._held[1] if self._held else None
            self._skip(f"the slot's step {held} is not replicated yet")
            return None
        target = self._next
        with self._exclusive(target) as free:
            if not free:  # the holder is sending this slot: keep it whole
                self._skip("the node's holder is sending the slot")
                return None
            payload = objects_payload(flat)
            if not self._fits(flat, payload):
                self._lay_out(flat)  # removes the records: under the lock too
            self._held = None  # torn until the record is written
            self._write(target, self._slots[target], step, flat, payload)
        self._next = (target + 1) % self.slots
        self._held = (self.attempt, step)
        return target

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reason = reason

    @contextlib.contextmanager
    def _exclusive(self, slot: int) -> Iterator[bool]:
        """With one slot and replicas: the slot file's exclusive lock, not waited for (False:
        the holder holds its shared lock, sending the slot); True otherwise, lock or not."""
        path = os.path.join(self.directory, slot_name(self.rank, slot))
        try:
            handle = os.open(path, os.O_RDONLY) if self.slots == 1 and self.replicas else -1
        except FileNotFoundError:  # never written: nobody sends it
            handle = -1
        try:
            if handle >= 0:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            yield True
        finally:
            if handle >= 0:
                os.close(handle)  # the lock goes with it

    def _write(
        self, target: int, slot: _Slot, step: int, flat: Mapping[str, Any], payload: bytes
    ) -> None:
        assert self.layout is not None
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
        for slot in range(SLOT_COUNT):  # every slot there may be (an earlier run had two)
            try:
                os.unlink(self.record_path(slot))
            except FileNotFoundError:
                pass
        self.close()
        write_json_atomic(os.path.join(self.directory, layout_name(self.rank)), layout.to_json())
        self._slots = [
            _Slot(os.path.join(self.directory, slot_name(self.rank, slot)), layout)
            for slot in range(self.slots)
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
