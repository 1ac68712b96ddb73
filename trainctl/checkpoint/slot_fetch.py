"""The bytes of a slot copy's entries for the `SlotReader`, each CRC-checked.

An entry whose stored chunk maps whole onto its destination (same offsets and shape, a
contiguous CPU tensor of its dtype: `direct_view`) is read straight into the destination's
memory — ``preadv`` from a local slot, a ranged get from a peer — and summed there, in place: no
buffer, no copy. Its bytes are in the state before their sum is known, so a mismatch
(`SlotChecksumError`) leaves the state dirty; the restore then falls back to durable storage,
whose load overwrites every tensor and value of the state (`memory.restore_tiers`).

Every other entry (resharded: part of a stored chunk; a CUDA destination; the non-tensor
values) is staged: a local slot's through a private mmap (in place; for GPU destinations
through the pinned staging buffer), a peer's through one `Staging` buffer reused across spans
(at most `SPAN_LIMIT` bytes of staged entries per span, more only for one entry larger than
that), summed, then handed to the caller to copy from.
A peer's needed entries are fetched span by span, one ranged get each, every entry of a span
landing in its own place (the destination, the staging buffer, or a scratch buffer for the
padding between entries).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trainctl.checkpoint.peer_wire import PeerError, fetch_range_into
from trainctl.checkpoint.slot_catalog import entry_sum
from trainctl.checkpoint.slot_layout import SLOT_SUM, RankCopy
from trainctl.checkpoint.slots import SlotError

SPAN_LIMIT = 256 * 2**20
"""Staged bytes of a peer's copy one span holds at most (the reader's staging buffer)."""
MAX_GAP = 2**20
"""Unneeded bytes between two needed entries read and dropped; a larger gap starts a new get."""
STAGE_ALIGN = 64
"""Alignment of each staged entry in the staging buffer (any dtype can view it)."""

Use = Callable[[int, torch.Tensor], None]
"""Called with (entry index, its verified bytes as a uint8 tensor) for every staged entry."""


class SlotChecksumError(SlotError):
    """An entry's bytes do not match the CRC the holder verified: the copy is not used."""


@dataclasses.dataclass(frozen=True)
class Need:
    """A needed entry: its index, where it lies in the slot, and whether it is read directly."""

    entry: int
    offset: int
    nbytes: int
    direct: bool


@dataclasses.dataclass(frozen=True)
class Span:
    """One ranged get: slot bytes [`start`, `end`), the needed entries in it, and where each
    staged one goes in the staging buffer (entry -> offset; `staged`: bytes used)."""

    start: int
    end: int
    needs: tuple[Need, ...]
    slots: tuple[tuple[int, int], ...]
    staged: int


def _aligned(value: int) -> int:
    return -(-value // STAGE_ALIGN) * STAGE_ALIGN


def plan_spans(needs: list[Need], limit: int = SPAN_LIMIT, max_gap: int = MAX_GAP) -> list[Span]:
    """`needs`, by offset, grouped into spans (pure): a new span where the gap since the previous
    entry is over `max_gap` or the span's staged entries would pass `limit` (a staged entry
    larger than `limit` is alone in its span). Direct entries take no staging."""
    spans: list[Span] = []
    current: list[Need] = []
    slots: list[tuple[int, int]] = []
    staged = 0

    def close() -> None:
        if current:
            end = current[-1].offset + current[-1].nbytes
            spans.append(Span(current[0].offset, end, tuple(current), tuple(slots), staged))

    for need in sorted(needs, key=lambda n: n.offset):
        cost = 0 if need.direct else _aligned(need.nbytes)
        if current:
            gap = need.offset - (current[-1].offset + current[-1].nbytes)
            if gap > max_gap or (cost and staged + cost > limit):
                close()
                current, slots, staged = [], [], 0
        if not need.direct:
            slots.append((need.entry, staged))
        current.append(need)
        staged += cost
    close()
    return spans


def direct_view(
    target: torch.Tensor, sizes: tuple[int, ...], dtype: torch.dtype
) -> memoryview | None:
    """The memory of `target` as bytes when a stored chunk of `sizes` and `dtype` can be read
    straight into it (a contiguous CPU tensor of that shape and dtype, not empty); else None."""
    if (
        target.device.type != "cpu"
        or target.dtype != dtype
        or tuple(target.size()) != sizes
        or not target.is_contiguous()
        or target.numel() == 0
    ):
        return None
    return tensor_bytes(target.reshape(-1).view(torch.uint8))


class Staging:
    """One staging buffer, grown only when a span needs more, reused across spans and copies
    (its pages faulted once); pinned when the destinations are on a GPU, and then local slots
    are staged through it too (`stage_local`: a pinned buffer copies to the GPU at full speed;
    a CPU destination copies from the slot's mapping directly)."""

    def __init__(self, pinned: bool = False, stage_local: bool | None = None) -> None:
        self.pinned = pinned
        self.stage_local = pinned if stage_local is None else stage_local
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # the old one goes first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._buffer

    @property
    def nbytes(self) -> int:
        return self._buffer.numel()


def source_text(copy: RankCopy) -> str:
    source = copy.source
    where = source.path or f"{source.endpoint}:{source.relative}"
    return f"old rank {copy.layout.rank}'s {source.kind} copy ({where})"


def check_crc(copy: RankCopy, entry_index: int, data: memoryview) -> None:
    """Raise SlotChecksumError unless `data` (the entry's bytes) sums to the recorded CRC."""
    want = copy.crcs[entry_index].rsplit(":", 1)[-1].lower()
    have = entry_sum(data)
    if have != want:
        entry = copy.layout.entries[entry_index]
        name = entry.get("fqn") or "the non-tensor values"
        raise SlotChecksumError(
            f"{source_text(copy)}: entry {entry_index} ({name}) fails its checksum: "
            f"{SLOT_SUM} {have}, expected {want}"
        )


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous uint8 CPU tensor, writable (no copy)."""
    array: Any = tensor.numpy()
    return memoryview(array) if tensor.numel() else memoryview(bytearray())


def read_copy(
    copy: RankCopy,
    token: str,
    needs: list[Need],
    targets: Mapping[int, memoryview],
    staging: Staging,
    use: Use,
    limit: int = SPAN_LIMIT,
) -> None:
    """Read `needs` of `copy`: direct ones into `targets` (entry -> the destination's bytes),
    staged ones handed to `use`; every entry CRC-checked before `use` sees it and before this
    returns; staged entries at most `limit` bytes per span. Raises SlotError
    (SlotChecksumError: a sum differs)."""
    if len(copy.crcs) != len(copy.layout.entries):
        raise SlotChecksumError(
            f"{source_text(copy)}: {len(copy.crcs)} checksums for "
            f"{len(copy.layout.entries)} entries"
        )
    source = copy.source
    if source.path is not None and not staging.stage_local:
        _read_mapped(copy, source.path, needs, targets, use)
        return
    if source.path is None and not (source.endpoint and source.relative):
        raise SlotError(f"{source_text(copy)}: neither a path nor an endpoint")
    scratch = bytearray(MAX_GAP) if len(needs) > 1 else bytearray()
    for span in plan_spans(needs, limit):
        buffer = staging.get(span.staged) if span.staged else None
        at = dict(span.slots)
        views: list[tuple[int, memoryview | None]] = []  # (offset, where; None: a gap)
        staged: dict[int, torch.Tensor] = {}
        position = span.start
        for need in span.needs:
            if need.offset > position:
                views.append((position, None))
            if need.direct:
                views.append((need.offset, targets[need.entry]))
            else:
                assert buffer is not None
                staged[need.entry] = buffer.narrow(0, at[need.entry], need.nbytes)
                views.append((need.offset, tensor_bytes(staged[need.entry])))
            position = need.offset + need.nbytes
        if source.path is not None:
            _pread(copy, source.path, [(o, v) for o, v in views if v is not None])
        else:
            assert source.endpoint and source.relative
            pieces = [
                view if view is not None else memoryview(scratch)[: _gap(views, i)]
                for i, (_, view) in enumerate(views)
            ]
            try:
                fetch_range_into(
                    source.endpoint,
                    token,
                    source.relative,
                    span.start,
                    [piece for piece in pieces if piece.nbytes],
                )
            except PeerError as error:
                raise SlotError(f"{source_text(copy)}: {error}") from None
        for need in span.needs:
            got = targets[need.entry] if need.direct else tensor_bytes(staged[need.entry])
            check_crc(copy, need.entry, got)
        for entry, data in staged.items():
            use(entry, data)


def _gap(views: list[tuple[int, memoryview | None]], index: int) -> int:
    """Bytes of the gap at `index` of a span's views: up to the next view's offset."""
    return views[index + 1][0] - views[index][0]


def _pread(copy: RankCopy, path: str, views: list[tuple[int, memoryview]]) -> None:
    """Read each (offset, buffer) of the local slot `path` into its buffer by ``preadv``."""
    with open(path, "rb") as file:
        for offset, view in views:
            done = 0
            while done < view.nbytes:
                got = os.preadv(file.fileno(), [view[done:]], offset + done)
                if got <= 0:
                    raise SlotError(f"{source_text(copy)}: ends before byte {offset + view.nbytes}")
                done += got


def _read_mapped(
    copy: RankCopy, path: str, needs: list[Need], targets: Mapping[int, memoryview], use: Use
) -> None:
    """A local slot, CPU destinations: direct entries by ``preadv`` into their destinations,
    the others summed and used in place through a private mapping (no staging copy)."""
    direct = [n for n in needs if n.direct]
    _pread(copy, path, [(n.offset, targets[n.entry]) for n in direct])
    for need in direct:
        check_crc(copy, need.entry, targets[need.entry])
    staged = [n for n in needs if not n.direct]
    if not staged:
        return
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), copy.layout.nbytes, access=mmap.ACCESS_COPY)
    raw = torch.frombuffer(mapped, dtype=torch.uint8)
    for need in staged:
        data = raw.narrow(0, need.offset, need.nbytes)
        check_crc(copy, need.entry, tensor_bytes(data))
        use(need.entry, data)
    del raw
