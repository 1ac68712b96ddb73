"""The memory tier's files: fixed-size slots per rank, their records, and the restore index.

A node's memory directory (`trainctl.checkpoint.layout.node_memory_root`) holds, under
``slots/``, for every rank R of the node (names from the functions below):

* ``rank-R.layout.json`` — written once per attempt by the rank (before its first slot
  record): where each tensor of its state lives in a slot file (`Layout`);
* ``rank-R.slot-K`` for K in 0..slots-1 (``checkpoint.memory.slots``, at most `SLOT_COUNT`)
  — preallocated files of ``Layout.nbytes`` that the rank copies its state into, alternately
  when there are two, so the newest complete copy is never the one being written;
* ``rank-R.slot-K.json`` — the slot's record (`SlotRecord`), written atomically after the
  copy and removed before the slot is written again: a slot without a record is never read;
* ``rank-R.slot-K.crc.json`` — per-entry CRC32s of the slot's step (`SlotChecksums`), written
  by the node's holder after the record, used to verify every copy (local, replica) before use.

Replicas of peer P's slots are kept under ``held/P/slots/`` with the same names. The restore
index (``restore/index.json``, `RestoreIndex`), written by the holder before the workers
start, says for every rank of the step to restore where its verified copy lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

SLOTS_DIR = "slots"
HELD_DIR = "held"
RESTORE_DIR = "restore"
INDEX_NAME = "index.json"
SLOT_COUNT = 2
"""Slots per copy by default, and the most there are (``checkpoint.memory.slots``)."""
PERMIT_NAME = "replicated.json"
"""``slots/replicated.json``: the holder's word to its workers with one slot per copy, whether
the step a slot holds may be overwritten (`trainctl.checkpoint.memory.may_overwrite`)."""
INDEX_VERSION = 2
"""``restore/index.json``'s format: 2 holds no token (1, before, held the peers' token)."""


def layout_name(rank: int) -> str:
    return f"rank-{rank:05d}.layout.json"


def slot_name(rank: int, slot: int) -> str:
    return f"rank-{rank:05d}.slot-{slot}"


def record_name(rank: int, slot: int) -> str:
    return f"{slot_name(rank, slot)}.json"


def checksums_name(rank: int, slot: int) -> str:
    return f"{slot_name(rank, slot)}.crc.json"


def write_json_atomic(path: str, value: Any) -> None:
    """Write `value` as JSON to `path` by a rename: a reader sees the old file or the new one."""
    folder = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(value, file, separators=(",", ":"))
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def slot_lock(path: str) -> Iterator[None]:
    """A shared lock on the slot file `path` while a holder sends it: it waits out a worker's
    write (which holds the exclusive lock, never waiting for it: it skips the save instead), so
    with one slot per copy a replica is never received from bytes being rewritten."""
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield
    finally:
        os.close(handle)  # the lock goes with the descriptor


def read_json(path: str) -> Any | None:
    """The JSON document at `path`, or None when it is missing or unreadable."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a rank's state lives in its slot files. Every entry has at least ``offset`` and
    ``nbytes`` (bytes in the slot); the rest (the DCP item it is) belongs to the worker."""

    rank: int
    world_size: int
    attempt: int
    nbytes: int
    entries: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        # Not `dataclasses.asdict`: it deep-copies every entry (~3 ms for tiny-gpt's layout),
        # and `digest` runs on every layout a holder reads from a peer. Same keys, same order.
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "nbytes": self.nbytes,
            "entries": list(self.entries),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Layout:
        return cls(
            rank=int(value["rank"]),
            world_size=int(value["world_size"]),
            attempt=int(value["attempt"]),
            nbytes=int(value["nbytes"]),
            entries=tuple(dict(entry) for entry in value["entries"]),
        )

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SlotRecord:
    """A slot holds rank `rank`'s whole state at `step` of `attempt` (`layout`: its digest)."""

    step: int
    attempt: int
    layout: str

    @classmethod
    def from_json(cls, value: Any) -> SlotRecord | None:
        try:
            return cls(int(value["step"]), int(value["attempt"]), str(value["layout"]))
        except (TypeError, KeyError, ValueError):
            return None


SLOT_SUM = "crc32c"
"""The checksum of slot entries: CRC-32C (Castagnoli), which SSE 4.2 and ARMv8 compute in
hardware (17 GB/s on this host against zlib's CRC-32 at 4 GB/s: a holder sums every step it
replicates, on the cores training uses). Durable checkpoints keep CRC-32, which S3 knows."""


@dataclasses.dataclass(frozen=True)
class SlotChecksums:
    """`SLOT_SUM` (8 hex digits) of every layout entry of a slot's `step`, in layout order."""

    step: int
    layout: str
    crcs: tuple[str, ...]

    @classmethod
    def from_json(cls, value: Any) -> SlotChecksums | None:
        """The sums, or None when the document does not fit or sums with another algorithm
        (an older release's CRC-32: unusable here, so the slot is summed again)."""
        try:
            if value.get("algorithm", "crc32") != SLOT_SUM:
                return None
            return cls(int(value["step"]), str(value["layout"]), tuple(map(str, value["crcs"])))
        except (AttributeError, TypeError, KeyError, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one copy of a rank's slot is: a local file (`path`), or a file `relative` to the
    memory directory of the holder at `endpoint` (read with the token of the reader's
    environment: no secret is written into the index)."""

    path: str | None = None
    endpoint: str | None = None
    relative: str | None = None
    kind: str = "own"
    """``own``: the rank's node's own slot; ``replica``: a peer's held copy."""

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Source:
        """A source as any index version wrote it (version 1's ``token`` is ignored)."""
        return cls(
            path=value.get("path"),
            endpoint=value.get("endpoint"),
            relative=value.get("relative"),
            kind=str(value.get("kind") or "own"),
        )


@dataclasses.dataclass(frozen=True)
class RankCopy:
    """The copy of old rank `layout.rank`'s slot the restore reads, and its checksums."""

    layout: Layout
    source: Source
    crcs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RestoreIndex:
    """``restore/index.json``: the step every rank of the old attempt has a verified copy of,
    the tier (``memory``: own copies only; ``peer``: a replica was used), and what was skipped."""

    step: int
    tier: str
    ranks: tuple[RankCopy, ...]
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "step": self.step,
            "tier": self.tier,
            "skipped": list(self.skipped),
            "seconds": self.seconds,
            "ranks": [
                {
                    "layout": copy.layout.to_json(),
                    "source": dataclasses.asdict(copy.source),
                    "crcs": list(copy.crcs),
                }
                for copy in self.ranks
            ],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RestoreIndex:
        """An index of this version or an older one; raises ValueError for a newer one (the
        restore then falls back to durable storage, saying why)."""
        version = int(value.get("version") or 1)
        if version > INDEX_VERSION:
            raise ValueError(
                f"restore index version {version} is newer than this trainctl reads "
                f"({INDEX_VERSION}): run the same trainctl version on every node"
            )
        return cls(
            step=int(value["step"]),
            tier=str(value["tier"]),
            skipped=tuple(map(str, value.get("skipped") or ())),
            seconds=float(value.get("seconds") or 0.0),
            ranks=tuple(
                RankCopy(
                    Layout.from_json(item["layout"]),
                    Source.from_json(item["source"]),
                    tuple(map(str, item["crcs"])),
                )
                for item in value["ranks"]
            ),
        )
