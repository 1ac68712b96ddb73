"""Restoring from the memory tier's slots: a DCP `StorageReader` over a `RestoreIndex`.

`SlotReader.read_metadata` builds DCP `Metadata` from every old rank's `Layout` (one chunk per
stored tensor chunk; a chunk that several old ranks hold, a replicated tensor, is read from one
copy: a local file first); DCP's planner then decides what this rank needs, so a world-size
change reshards from memory exactly as from storage. `read_data` reads only the entries its
load plan asks for (`slot_fetch`): a stored chunk that maps whole onto its destination straight
into the destination's memory (``preadv`` from a local copy, `Source.path`; a ranged get from a
remote one, `Source.endpoint`, with the read token of the worker's token file), the others
through a read-only mmap or one reused staging buffer. Every entry is checked against its CRC
before it is committed; a direct one lands first, so a mismatch leaves the state dirty and the
durable restore that follows overwrites all of it.

`SlotRestorer` is the memory tier as `trainctl.checkpoint.memory.restore_tiers` drives it: the
ranks agree on the index's step (a collective), then load it through DCP; any failure is a
`RestoreError`, so the restore falls back to durable storage with a ``restore_skipped`` event.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import time
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
from trainctl.checkpoint.restore import RestoreError
from trainctl.checkpoint.slot_fetch import (
    SPAN_LIMIT,
    Need,
    SlotChecksumError,
    Staging,
    direct_view,
    read_copy,
    tensor_bytes,
)
from trainctl.checkpoint.slot_layout import RankCopy, RestoreIndex
from trainctl.checkpoint.slots import OBJECTS, OBJECTS_HEADER, TENSOR, SlotError, dtype_of
from trainctl.env import Env
from trainctl.events import CheckpointRestored
from trainctl.secrets import read_private

EventSink = Callable[[str, dict[str, Any]], None]
__all__ = ["SPAN_LIMIT", "SlotChecksumError", "SlotReader", "SlotRestorer", "agree_on_step"]


@dataclasses.dataclass(frozen=True)
class _Where:
    copy: int
    """Index into the restore index's ranks."""
    entry: int
    """Index into that copy's layout entries."""


class SlotReader(StorageReader):
    """DCP reader of the step a `RestoreIndex` names."""

    def __init__(self, index: RestoreIndex, token: str | None = None) -> None:
        """`token`: what peers' copies are read with (default: the worker's environment,
        the file ``TRAINCTL_PEER_TOKEN_FILE`` names, written by the node agent; the index
        never holds it)."""
        super().__init__()
        self.index = index
        if token is None:
            token = read_private(os.environ.get(Env.PEER_TOKEN_FILE, ""))
        self.token = token
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
        """Load `plan`'s items, copy by copy (`slot_fetch.read_copy`): a whole stored chunk
        straight into its destination, the rest through staging; every entry CRC-checked."""
        by_copy: dict[int, list[tuple[Any, _Where]]] = {}
        for item in plan.items:
            index = item.storage_index
            offsets = None if item.type == LoadItemType.BYTE_IO else tuple(index.offset or ())
            where = self._locate(index.fqn, offsets)
            by_copy.setdefault(where.copy, []).append((item, where))
        targets = {
            id(item): planner.resolve_tensor(item).detach()
            for items in by_copy.values()
            for item, _ in items
            if item.type != LoadItemType.BYTE_IO
        }
        staging = Staging(pinned=any(t.device.type == "cuda" for t in targets.values()))
        for copy_index, items in sorted(by_copy.items()):
            _load_copy(self.index.ranks[copy_index], self.token, items, targets, staging, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _whole(item: Any, entry: dict[str, Any]) -> bool:
    """Whether `item` reads all of the stored chunk `entry` (no reshard of it)."""
    sizes = [int(s) for s in entry["chunk_sizes"]]
    return all(o == 0 for o in item.storage_offsets) and list(item.lengths) == sizes


def _load_copy(
    copy: RankCopy,
    token: str,
    items: list[tuple[Any, _Where]],
    targets: dict[int, torch.Tensor],
    staging: Staging,
    planner: LoadPlanner,
) -> None:
    """Read the entries `items` need from `copy` and load the items: those read directly are
    committed once their entry's sum matched, the rest copied out of their verified bytes."""
    entries = copy.layout.entries
    readers: dict[int, list[Any]] = {}
    for item, where in items:
        readers.setdefault(where.entry, []).append(item)
    views: dict[int, memoryview] = {}
    for entry_index, [item, *others] in readers.items():
        entry = entries[entry_index]
        if others or item.type == LoadItemType.BYTE_IO or not _whole(item, entry):
            continue
        sizes = tuple(int(s) for s in entry["chunk_sizes"])
        view = direct_view(targets[id(item)], sizes, dtype_of(str(entry["dtype"])))
        if view is not None and view.nbytes == int(entry["nbytes"]):
            views[entry_index] = view
    needs = [
        Need(i, int(entries[i]["offset"]), int(entries[i]["nbytes"]), i in views)
        for i in sorted(readers)
    ]

    def use(entry_index: int, data: torch.Tensor) -> None:
        _load_items(entries[entry_index], data, readers[entry_index], targets, planner)

    read_copy(copy, token, needs, views, staging, use)
    for entry_index in views:
        item = readers[entry_index][0]
        planner.commit_tensor(item, targets[id(item)])


def _load_items(
    entry: dict[str, Any],
    data: torch.Tensor,
    items: list[Any],
    targets: dict[int, torch.Tensor],
    planner: LoadPlanner,
) -> None:
    """Load `items` from `data`, the verified bytes (uint8) of the stored entry `entry`."""
    if entry["kind"] == OBJECTS:
        raw = tensor_bytes(data)
        (length,) = OBJECTS_HEADER.unpack_from(raw, 0)
        body = OBJECTS_HEADER.size
        objects = pickle.loads(bytes(raw[body : body + length]))
        for item in items:
            value = io.BytesIO()
            torch.save(objects[item.storage_index.fqn], value)
            value.seek(0)
            planner.load_bytes(item, value)
        return
    sizes = tuple(int(s) for s in entry["chunk_sizes"])
    dtype = dtype_of(str(entry["dtype"]))
    for item in items:
        stored = data.view(dtype).view(sizes) if data.numel() else torch.empty(sizes, dtype=dtype)
        for dim, (offset, length) in enumerate(
            zip(item.storage_offsets, item.lengths, strict=True)
        ):
            stored = stored.narrow(dim, offset, length)
        target = targets[id(item)]
        if target.size() != stored.size():
            raise SlotError(
                f"{item.storage_index.fqn}: slot chunk {tuple(stored.size())} does not match the "
                f"requested {tuple(target.size())}"
            )
        target.copy_(stored)
        planner.commit_tensor(item, target)


class SlotRestorer:
    """The memory tier's restore, for `restore_tiers`: the step `load_index` names, agreed by
    every rank of `group`, loaded through DCP; events go to `emit` (rank 0)."""

    def __init__(
        self,
        load_index: Callable[[], RestoreIndex | str],
        group: dist.ProcessGroup | None,
        emit: EventSink,
        tier: str = "memory",
        token: str | None = None,
    ) -> None:
        self._load_index = load_index
        self._token = token
        """Peers' copies are read with it (None: the worker's environment's)."""
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
                storage_reader=SlotReader(index, self._token),
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
