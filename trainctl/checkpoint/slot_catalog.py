"""Reading a slots folder as the holder sees it: every rank's layout, slot records and checksums
(`trainctl.checkpoint.slot_layout` names them), here or at a peer, and the CRCs of a slot.

A folder is read as its JSON documents (relative name -> parsed JSON): from the local disk
(`read_json_tree`, with a cache so a holder polling every tick parses a big layout only when it
changed) or from a peer's holder (`peer_wire.catalog`, one request for a whole tree), then
`parse_slots` turns them into `RankSlots` and drops what does not fit together (a record of
another layout, checksums of another step).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import crc32c

from trainctl.checkpoint.slot_layout import SLOT_SUM, Layout, SlotChecksums, SlotRecord

_NAME = re.compile(r"^rank-(\d+)\.(layout|slot-(\d+)|slot-(\d+)\.crc)\.json$")


@dataclasses.dataclass(frozen=True)
class RankSlots:
    """One rank's slots in one folder: its layout, the records of its slots that belong to that
    layout (slot index -> record) and the checksums that belong to those records."""

    layout: Layout
    records: dict[int, SlotRecord]
    checksums: dict[int, SlotChecksums]
    digest: str = ""
    """`layout.digest`, computed once per layout document (it costs milliseconds)."""

    def checksummed(self) -> dict[int, SlotRecord]:
        """The slots whose record has its checksums (slot index -> record)."""
        return {index: rec for index, rec in self.records.items() if index in self.checksums}


def parse_slots(docs: Mapping[str, Any]) -> dict[int, RankSlots]:
    """The ranks of a slots folder from its documents (file name -> parsed JSON); a rank without
    a readable layout is left out, records of another layout and stale checksums too."""
    layouts: dict[int, Layout] = {}
    records: dict[int, dict[int, SlotRecord]] = {}
    sums: dict[int, dict[int, SlotChecksums]] = {}
    digests: dict[int, str] = {}
    for name, value in docs.items():
        match = _NAME.match(os.path.basename(name))
        if match is None:
            continue
        rank = int(match.group(1))
        if match.group(2) == "layout":
            parsed = _parse_layout(value)
            if parsed is not None:
                layouts[rank], digests[rank] = parsed
        elif match.group(3) is not None:
            record = SlotRecord.from_json(value)
            if record is not None:
                records.setdefault(rank, {})[int(match.group(3))] = record
        else:
            checksums = SlotChecksums.from_json(value)
            if checksums is not None:
                sums.setdefault(rank, {})[int(match.group(4))] = checksums
    ranks = {}
    for rank, layout in layouts.items():
        digest = digests[rank]
        mine = {i: r for i, r in records.get(rank, {}).items() if r.layout == digest}
        good = {
            i: c
            for i, c in sums.get(rank, {}).items()
            if i in mine
            and c.step == mine[i].step
            and c.layout == digest
            and len(c.crcs) == len(layout.entries)
        }
        ranks[rank] = RankSlots(layout, mine, good, digest)
    return ranks


_LAYOUTS: dict[int, tuple[Any, Layout, str]] = {}
"""Parsed layout documents by identity (`JsonCache` hands back the same object while the file
is unchanged), each with its digest: a holder polling every tick would otherwise spend ~3 ms
a rank on `Layout.digest` (a deep copy and a sha256 of the whole layout) per tick."""
_LAYOUTS_KEPT = 256


_LAYOUTS_LOCK = threading.Lock()


def _parse_layout(value: Any) -> tuple[Layout, str] | None:
    with _LAYOUTS_LOCK:
        known = _LAYOUTS.get(id(value))
    if known is not None and known[0] is value:
        return known[1], known[2]
    try:
        layout = Layout.from_json(value)
    except (TypeError, KeyError, ValueError):
        return None
    digest = layout.digest
    with _LAYOUTS_LOCK:
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[id(value)] = (value, layout, digest)  # the value is kept: its id stays unique
    return layout, digest


def checksums_json(record: SlotRecord, crcs: Sequence[str]) -> dict[str, Any]:
    """The ``.crc.json`` document of a slot holding `record` (`SlotChecksums`)."""
    return {
        "step": record.step,
        "layout": record.layout,
        "algorithm": SLOT_SUM,
        "crcs": list(crcs),
    }


def record_json(record: SlotRecord) -> dict[str, Any]:
    return {"step": record.step, "attempt": record.attempt, "layout": record.layout}


def spans(layout: Layout) -> list[tuple[int, int]]:
    """(offset, nbytes) of every entry of `layout`, in layout order."""
    return [(int(entry["offset"]), int(entry["nbytes"])) for entry in layout.entries]


def slot_crcs(path: str, entries: Sequence[tuple[int, int]]) -> list[str]:
    """The CRC32 of every (offset, nbytes) range of the file at `path`, summed over an mmap
    (`entry_sum` releases the GIL: training threads run meanwhile). Raises OSError when the file is
    missing or shorter than an entry."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        _check_fits(path, size, entries)
        if size == 0:
            return [crc_text(0) for _ in entries]
        with mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            return sum_entries(mapped, entries)


def _check_fits(path: str, size: int, entries: Sequence[tuple[int, int]]) -> None:
    if any(offset < 0 or offset + nbytes > size for offset, nbytes in entries):
        raise OSError(f"{path}: {size} bytes, shorter than its layout")


def sum_entries(buffer: Any, entries: Sequence[tuple[int, int]]) -> list[str]:
    """`entry_sum` of every (offset, nbytes) range of `buffer` (a slot's bytes), in order."""
    view = memoryview(buffer)
    try:
        return [entry_sum(view[offset : offset + nbytes]) for offset, nbytes in entries]
    finally:
        view.release()


def crc_text(value: int) -> str:
    """A CRC as `SlotChecksums` keeps it: 8 hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def entry_sum(data: Any) -> str:
    """The checksum of one slot entry's bytes (`SLOT_SUM`, as `crc_text`). The GIL is released
    while it sums (the library does so past 32 KiB)."""
    return crc_text(crc32c.crc32c(data))


def read_json_tree(folder: str, cache: JsonCache | None = None) -> dict[str, Any]:
    """Every ``*.json`` file under `folder` (relative name -> parsed JSON), temporaries and
    unreadable files left out; {} when there is no folder."""
    docs: dict[str, Any] = {}
    reader = cache or JsonCache()
    for current, _dirs, files in os.walk(folder):
        for name in files:
            if not name.endswith(".json") or name.startswith(".tmp-"):
                continue
            path = os.path.join(current, name)
            value = reader.read(path)
            if value is not None:
                docs[os.path.relpath(path, folder)] = value
    return docs


def folders_stamp(folders: Sequence[str], fresh_s: float) -> tuple[object, ...] | None:
    """(inode, mtime) of every folder (None: missing), which changes whenever a file in one is
    renamed in or removed (every write here is a rename); None when a folder changed less than
    `fresh_s` ago: file times come from a coarse clock (a jiffy), so a rename in the same clock
    tick as the look would leave the stamp unchanged."""
    stamps: list[object] = []
    fresh = time.time_ns() - int(fresh_s * 1e9)
    for folder in folders:
        try:
            stat = os.stat(folder)
        except OSError:
            stamps.append(None)
            continue
        if stat.st_mtime_ns > fresh:
            return None
        stamps.append((stat.st_ino, stat.st_mtime_ns))
    return tuple(stamps)


class JsonCache:
    """Parsed JSON files, parsed again only when a file's inode, size or mtime changed (every
    write here is a rename, so a changed file is a new inode)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int], Any]] = {}

    def read(self, path: str) -> Any | None:
        try:
            stat = os.stat(path)
        except OSError:
            self._seen.pop(path, None)
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = self._seen.get(path)
        if known is not None and known[0] == key:
            return known[1]
        try:
            with open(path) as file:
                value = json.load(file)
        except (OSError, ValueError):
            return None
        self._seen[path] = (key, value)
        return value


class MappedSlots:
    """`slot_crcs` over read-only mappings kept from one sum to the next (one thread's).

    Mapping a slot afresh for every sum costs a page fault per few pages (~0.8 ms of CPU for
    6 MiB, half as much again as the CRC itself) on every replication round. A mapping is kept
    while its path names the same file (inode and size: a worker replaces a slot file of
    another size by a rename, never truncating it in place); `prune` releases those of files
    gone or replaced, so a dropped slot's memory is not held past the next prune."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap]] = {}

    def crcs(self, path: str, entries: Sequence[tuple[int, int]]) -> list[str]:
        """As `slot_crcs(path, entries)`."""
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            size = stat.st_size
            _check_fits(path, size, entries)
            if size == 0:
                return [crc_text(0) for _ in entries]
            key = (stat.st_ino, size)
            known = self._maps.get(path)
            if known is None or known[0] != key:
                self.forget(path)
                mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
                self._maps[path] = known = (key, mapped)
        return sum_entries(known[1], entries)

    def forget(self, path: str) -> None:
        known = self._maps.pop(path, None)
        if known is not None:
            try:
                known[1].close()
            except BufferError:  # a sum still reads it (closing holder): it goes with the view
                pass

    def prune(self) -> None:
        """Release the mappings whose path no longer names the mapped file."""
        for path, (key, _mapped) in list(self._maps.items()):
            try:
                stat = os.stat(path)
            except OSError:
                self.forget(path)
                continue
            if (stat.st_ino, stat.st_size) != key:
                self.forget(path)

    def close(self) -> None:
        for path in list(self._maps):
            self.forget(path)
