"""Restoring from the memory tier's slots: a DCP `StorageReader` over a `RestoreIndex`.

`SlotReader.read_metadata` builds DCP `Metadata` from every old rank's `Layout` (one chunk per
stored tensor chunk; a chunk that several old ranks hold, a replicated tensor, is read from one
copy: a local file first); DCP's planner then decides what this rank needs, so a world-size
change reshards from memory exactly as from storage. `read_data` reads only the entries its
load plan asks for: a local copy (`Source.path`) through a read-only mmap, a remote one
(`Source.endpoint`) by one ranged get per span of needed entries (`peer_wire.fetch_range`).
Every entry read is checked against its CRC before any byte of it is used.

`SlotRestorer` is the memory tier as `trainctl.checkpoint.memory.restore_tiers` drives it: the
ranks agree on the index's step (a collective), then load it through DCP; any failure is a
`RestoreError`, so the restore falls back to durable storage with a ``restore_skipped`` event.
"""

from __future__ import annotations

import dataclasses
import io
import mmap
import pickle
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from trainctl.checkpoint.collectives import Collectives
from trainctl.checkpoint.peer_wire import PeerError, fetch_range
from trainctl.checkpoint.restore import RestoreError
from trainctl.checkpoint.slot_catalog import crc_text
from trainctl.checkpoint.slot_layout import RankCopy, RestoreIndex
from trainctl.checkpoint.slots import OBJECTS, OBJECTS_HEADER, TENSOR, SlotError, dtype_of
from trainctl.events import CheckpointRestored

SPAN_LIMIT = 256 * 2**20
"""Bytes one ranged get of a remote copy fetches at most (entries are grouped up to it)."""

EventSink = Callable[[str, dict[str, Any]], None]


class SlotChecksumError(SlotError):
    """An entry's bytes do not match the CRC the holder verified: the copy is not used."""


@dataclasses.dataclass(frozen=True)
class _Where:
    copy: int
    """Index into the restore index's ranks."""
    entry: int
    """Index into that copy's layout entries."""


def _source_text(copy: RankCopy) -> str:
    source = copy.source
    where = source.path or f"{source.endpoint}:{source.relative}"
    return f"old rank {copy.layout.rank}'s {source.kind} copy ({where})"


def _expected(crc: str) -> str:
    return crc.rsplit(":", 1)[-1].lower()


class SlotReader(StorageReader):
    """DCP reader of the step a `RestoreIndex` names."""

    def __init__(self, index: RestoreIndex) -> None:
        super().__init__()
        self.index = index
        self._where: dict[tuple[str, tuple[int, ...] | None], _Where] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every old rank's chunks; a chunk held by several copies is read from the best one
        (a local file, then the lowest old rank)."""
        order = sorted(
            range(len(self.index.ranks)),
            key=lambda i: (
                self.index.ranks[i].source.path is None,
                self.index.ranks[i].layout.rank,
            ),
        )
        tensors: dict[str, TensorStorageMetadata] = {}
        objects: set[str] = set()
        self._where = {}
        for copy_index in order:
            for entry_index, entry in enumerate(self.index.ranks[copy_index].layout.entries):
                where = _Where(copy_index, entry_index)
                if entry["kind"] == OBJECTS:
                    for fqn in entry["fqns"]:
                        objects.add(str(fqn))
                        self._where.setdefault((str(fqn), None), where)
                    continue
                if entry["kind"] != TENSOR:
                    raise SlotError(f"unknown slot entry kind {entry['kind']!r}")
                fqn, offsets = str(entry["fqn"]), tuple(int(o) for o in entry["chunk_offsets"])
                if (fqn, offsets) in self._where:
                    continue
                self._where[(fqn, offsets)] = where
                chunk = ChunkStorageMetadata(
                    offsets=torch.Size(offsets),
                    sizes=torch.Size(int(s) for s in entry["chunk_sizes"]),
                )
                if fqn not in tensors:
                    tensors[fqn] = TensorStorageMetadata(
                        properties=TensorProperties(dtype=dtype_of(str(entry["dtype"]))),
                        size=torch.Size(int(s) for s in entry["global_size"]),
                        chunks=[],
                    )
                tensors[fqn].chunks.append(chunk)
        metadata: dict[str, Any] = dict(tensors)
        metadata.update({fqn: BytesStorageMetadata() for fqn in objects})
        return Metadata(state_dict_metadata=metadata)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if not self._where:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _locate(self, fqn: str, offsets: tuple[int, ...] | None) -> _Where:
        where = self._where.get((fqn, offsets))
        if where is None:
            raise SlotError(f"{fqn} at {offsets}: no slot entry holds it")
        return where

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Load `plan`'s items, copy by copy; each entry is CRC-checked before it is used."""
        by_copy: dict[int, list[tuple[Any, _Where]]] = {}
        for item in plan.items:
            index = item.storage_index
            offsets = None if item.type == LoadItemType.BYTE_IO else tuple(index.offset or ())
            where = self._locate(index.fqn, offsets)
            by_copy.setdefault(where.copy, []).append((item, where))
        for copy_index, items in sorted(by_copy.items()):
            copy = self.index.ranks[copy_index]
            needed = sorted({where.entry for _, where in items})
            for buffer, base, entries in _read_entries(copy, needed):
                _load_items(copy, buffer, base, entries, items, planner)
                del buffer
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _spans(copy: RankCopy, needed: list[int]) -> list[list[int]]:
    """Entry indices grouped into contiguous spans of at most `SPAN_LIMIT` bytes."""
    spans: list[list[int]] = []
    entries = copy.layout.entries
    for entry in needed:
        if spans:
            first = entries[spans[-1][0]]
            end = int(entries[entry]["offset"]) + int(entries[entry]["nbytes"])
            if end - int(first["offset"]) <= SPAN_LIMIT:
                spans[-1].append(entry)
                continue
        spans.append([entry])
    return spans


def _read_entries(copy: RankCopy, needed: list[int]) -> list[tuple[Any, int, list[int]]]:
    """(buffer, byte offset of the buffer in the slot, entry indices it covers) for `needed`,
    every entry CRC-checked: the local file mmap'd whole, a remote one by ranged gets."""
    if len(copy.crcs) != len(copy.layout.entries):
        raise SlotChecksumError(
            f"{_source_text(copy)}: {len(copy.crcs)} checksums for "
            f"{len(copy.layout.entries)} entries"
        )
    if copy.source.path is not None:
        with open(copy.source.path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), copy.layout.nbytes, access=mmap.ACCESS_COPY)
        parts: list[tuple[Any, int, list[int]]] = [(mapped, 0, needed)]
    else:
        source = copy.source
        if not (source.endpoint and source.relative):
            raise SlotError(f"{_source_text(copy)}: neither a path nor an endpoint")
        parts = []
        for span in _spans(copy, needed):
            first, last = copy.layout.entries[span[0]], copy.layout.entries[span[-1]]
            start = int(first["offset"])
            length = int(last["offset"]) + int(last["nbytes"]) - start
            try:
                data = fetch_range(
                    source.endpoint, source.token or "", source.relative, start, length
                )
            except PeerError as error:
                raise SlotError(f"{_source_text(copy)}: {error}") from None
            parts.append((data, start, span))
    for buffer, base, entries in parts:
        view = memoryview(buffer)
        for entry_index in entries:
            entry = copy.layout.entries[entry_index]
            start = int(entry["offset"]) - base
            crc = crc_text(zlib.crc32(view[start : start + int(entry["nbytes"])]))
            if crc != _expected(copy.crcs[entry_index]):
                name = entry["fqn"] or "the non-tensor values"
                raise SlotChecksumError(
                    f"{_source_text(copy)}: entry {entry_index} ({name}) fails its checksum: "
                    f"crc32 {crc}, expected {_expected(copy.crcs[entry_index])}"
                )
        view.release()
    return parts


def _load_items(
    copy: RankCopy,
    buffer: Any,
    base: int,
    entries: list[int],
    items: list[tuple[Any, _Where]],
    planner: LoadPlanner,
) -> None:
    covered = set(entries)
    raw = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0)
    objects: dict[str, Any] | None = None
    for item, where in items:
        if where.entry not in covered:
            continue
        entry = copy.layout.entries[where.entry]
        start = int(entry["offset"]) - base
        if item.type == LoadItemType.BYTE_IO:
            if objects is None:
                (length,) = OBJECTS_HEADER.unpack_from(buffer, start)
                body = start + OBJECTS_HEADER.size
                objects = pickle.loads(bytes(buffer[body : body + length]))
            value = io.BytesIO()
            torch.save(objects[item.storage_index.fqn], value)
            value.seek(0)
            planner.load_bytes(item, value)
            continue
        sizes = tuple(int(s) for s in entry["chunk_sizes"])
        dtype = dtype_of(str(entry["dtype"]))
        nbytes = int(entry["nbytes"])
        stored = (
            raw.narrow(0, start, nbytes).view(dtype).view(sizes)
            if nbytes
            else torch.empty(sizes, dtype=dtype)
        )
        for dim, (offset, length) in enumerate(
            zip(item.storage_offsets, item.lengths, strict=True)
        ):
            stored = stored.narrow(dim, offset, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != stored.size():
            raise SlotError(
                f"{item.storage_index.fqn}: slot chunk {tuple(stored.size())} does not match the "
                f"requested {tuple(target.size())}"
            )
        target.copy_(stored)
        planner.commit_tensor(item, target)
    del raw


class SlotRestorer:
    """The memory tier's restore, for `restore_tiers`: the step `load_index` names, agreed by
    every rank of `group`, loaded through DCP; events go to `emit` (rank 0)."""

    def __init__(
        self,
        load_index: Callable[[], RestoreIndex | str],
        group: dist.ProcessGroup | None,
        emit: EventSink,
        tier: str = "memory",
    ) -> None:
        self._load_index = load_index
        self._group = group
        self._collectives = Collectives(group)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self._emit = emit
        self.tier = tier
        self.index: RestoreIndex | None = None
        self.missing_reason = "no committed step in memory"

    def emit(self, name: str, fields: dict[str, Any]) -> None:
        if self.rank == 0:
            self._emit(name, fields)

    def newest_listed_step(self) -> int | None:
        """The step every rank's index names (a collective); None, with `missing_reason`, when
        a rank has none or two ranks' indexes disagree."""
        try:
            found = self._load_index()
        except (OSError, ValueError, KeyError, TypeError) as error:
            found = f"unreadable restore index: {type(error).__name__}: {error}"
        mine = found.step if isinstance(found, RestoreIndex) else None
        views = self._collectives.all_gather((mine, found if isinstance(found, str) else ""))
        agreed = agree_on_step(views)
        if isinstance(agreed, str):
            self.missing_reason = agreed
            return None
        assert isinstance(found, RestoreIndex)
        self.index = found
        self.tier = found.tier
        return found.step

    def restore_latest(self, state: Mapping[str, Any]) -> int | None:
        """Load the agreed step into `state` (call `newest_listed_step` first, on every rank);
        raises RestoreError when any rank's load failed (every rank raises)."""
        index = self.index
        if index is None:
            return None
        started = time.perf_counter()
        target = state if isinstance(state, dict) else dict(state)
        try:
            dcp.load(
                target,
                storage_reader=SlotReader(index),
                process_group=self._group,
                no_dist=self._group is None,
            )
        except CheckpointException as error:
            reasons = "; ".join(
                f"rank {rank}: {_failure_text(failure)}" for rank, failure in error.failures.items()
            )
            raise RestoreError(f"step {index.step}: {reasons}") from None
        except Exception as error:
            raise RestoreError(f"step {index.step}: {type(error).__name__}: {error}") from None
        self.emit(
            CheckpointRestored.KIND,
            {
                "step": index.step,
                "size_bytes": sum(copy.layout.nbytes for copy in index.ranks),
                "saved_world_size": len(index.ranks),
                "world_size": self.world_size,
                "restore_s": time.perf_counter() - started,
                "tier": index.tier,
            },
        )
        return index.step


def agree_on_step(views: list[tuple[int | None, str]]) -> int | str:
    """The step every rank's restore index names (`views`: per rank, its index's step or None
    and why none), or why the ranks do not restore from memory (pure)."""
    missing = [f"rank {rank}: {why}" for rank, (step, why) in enumerate(views) if step is None]
    if missing or not views:
        shown = "; ".join(missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        return f"no step to restore in memory ({shown or 'no rank'}{more})"
    steps = sorted({step for step, _ in views if step is not None})
    if len(steps) > 1:
        return f"the nodes' restore indexes name different steps {steps}: not restoring from memory"
    return steps[0]


def _failure_text(failure: Any) -> str:
    error = failure[0] if isinstance(failure, tuple) else failure
    return f"{type(error).__name__}: {error}"
