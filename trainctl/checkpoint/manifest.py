"""The manifest: a step's commit marker and the list of everything it must contain (pure).

`manifest.json` is written last, by one rank, after every rank's upload finished. A step
directory without one is not a checkpoint (a crashed or in-progress save). It records every
object of the step with its size, whole-object checksum and per-block checksums, so that restore
and `trainctl ckpt verify` can prove each byte they read is the byte that was written.

This module only builds, serialises and checks manifests; reading objects is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from trainctl.checkpoint.checksum import ALGORITHM, BytesLike, StreamingChecksum, checksum_of

FORMAT = "trainctl-checkpoint/1"


class ManifestError(ValueError):
    """A manifest that cannot be parsed or does not describe a valid checkpoint."""


@dataclass(frozen=True)
class ObjectRecord:
    """One object of a step, as written."""

    path: str
    """Path relative to the step directory (``__0_0.distcp``, ``.metadata``)."""
    size: int
    """Size in bytes."""
    checksum: str
    """Whole-object checksum (``crc32:xxxxxxxx``)."""
    block_size: int
    """Size of the blocks `block_checksums` cover (the last block may be shorter)."""
    block_checksums: tuple[str, ...]
    """Checksum of each block, in order."""
    rank: int = 0
    """The rank that wrote the object."""
    head_size: int = 0
    """Bytes at the start of the object that `head_checksum` covers on their own (0: none)."""
    head_checksum: str = ""
    """Checksum of bytes ``[0, head_size)``. DCP stores items every rank loads (optimizer step
    counts, param groups) once, in one rank's file, and trainctl writes them at its head: every
    other rank reads those few KB, verified as the head, instead of the whole first block (a
    part: 16-64 MiB)."""

    def block_range(self, start: int, end: int) -> tuple[int, int]:
        """The smallest verifiable byte range covering ``[start, end)``: the head when the
        range lies within it, else whole blocks, clipped to the size."""
        if self.head_size and end <= self.head_size:
            return 0, self.head_size
        first = (start // self.block_size) * self.block_size
        last = min(self.size, -(-end // self.block_size) * self.block_size)
        return first, last

    def verify_range(self, offset: int, data: BytesLike) -> list[str]:
        """Check `data`, read from block-aligned `offset`, against the block checksums.

        Returns one line per problem (empty when everything matches). Whole blocks only: a
        range that does not end at a block boundary must end at the object's end.
        """
        view = memoryview(data).cast("B")
        if self.head_size and offset == 0 and len(view) == self.head_size:
            if checksum_of(view) != self.head_checksum:
                return [
                    f"{self.path}: checksum mismatch in the head (bytes 0..{self.head_size}): "
                    f"expected {self.head_checksum}, got {checksum_of(view)}"
                ]
            return []
        if offset % self.block_size:
            return [f"{self.path}: read offset {offset} is not aligned to {self.block_size}"]
        if offset + len(view) > self.size:
            return [f"{self.path}: read past the recorded size {self.size}"]
        end = offset + len(view)
        if end != self.size and end % self.block_size:
            return [f"{self.path}: read end {end} is not aligned to {self.block_size}"]
        problems = []
        for position in range(0, len(view), self.block_size):
            index = (offset + position) // self.block_size
            if index >= len(self.block_checksums):
                problems.append(f"{self.path}: block {index} is not in the manifest")
                break
            summer = StreamingChecksum(self.block_size)
            summer.update(view[position : position + self.block_size])
            if summer.whole() != self.block_checksums[index]:
                problems.append(
                    f"{self.path}: checksum mismatch in block {index} (bytes "
                    f"{offset + position}..{min(end, offset + position + self.block_size)}): "
                    f"expected {self.block_checksums[index]}, got {summer.whole()}"
                )
        return problems


@dataclass(frozen=True)
class Manifest:
    """What one committed step holds."""

    step: int
    """The training step the state belongs to."""
    world_size: int
    """Number of ranks that wrote it."""
    created_at: str
    """When it was committed: ISO-8601 in UTC (``2026-11-24T06:30:00+00:00``)."""
    objects: tuple[ObjectRecord, ...]
    """Every object of the step except the manifest itself."""
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds spent per phase (``stage_s``, ``upload_s``, ``commit_s``...)."""
    trainctl_version: str = ""
    """Version of trainctl that wrote it."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable facts the caller attached (never credentials)."""
    checksum_algorithm: str = ALGORITHM
    """Algorithm of every checksum in the manifest."""
    format: str = FORMAT
    """Manifest format version."""

    @property
    def size_bytes(self) -> int:
        """Total size of the step's objects."""
        return sum(record.size for record in self.objects)

    def record(self, path: str) -> ObjectRecord | None:
        """The record of `path` (relative to the step directory), or None."""
        for record in self.objects:
            if record.path == path:
                return record
        return None

    def to_json(self) -> str:
        """Serialise (stable key order, one object per line for readable diffs)."""
        body = asdict(self)
        body["objects"] = [asdict(record) for record in self.objects]
        for record in body["objects"]:
            record["block_checksums"] = list(record["block_checksums"])
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest; raises ManifestError on anything malformed or of another format."""
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"manifest is not valid JSON: {error}") from error
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            got = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise ManifestError(f"not a {FORMAT} manifest (format {got!r})")
        if body.get("checksum_algorithm") != ALGORITHM:
            raise ManifestError(
                f"unsupported checksum algorithm {body.get('checksum_algorithm')!r}"
            )
        try:
            objects = tuple(
                ObjectRecord(
                    path=str(item["path"]),
                    size=int(item["size"]),
                    checksum=str(item["checksum"]),
                    block_size=int(item["block_size"]),
                    block_checksums=tuple(str(c) for c in item["block_checksums"]),
                    rank=int(item.get("rank", 0)),
                    head_size=int(item.get("head_size", 0)),
                    head_checksum=str(item.get("head_checksum", "")),
                )
                for item in body["objects"]
            )
            return cls(
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                created_at=str(body["created_at"]),
                objects=objects,
                timings={str(k): float(v) for k, v in dict(body.get("timings", {})).items()},
                trainctl_version=str(body.get("trainctl_version", "")),
                extra=dict(body.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"manifest is missing or has a bad field: {error!r}") from error


@dataclass(frozen=True)
class ObjectProblem:
    """Why one object of a committed step cannot be trusted."""

    path: str
    problem: str


def check_listing(manifest: Manifest, listed_sizes: Mapping[str, int]) -> list[ObjectProblem]:
    """Compare the manifest with what storage lists (path relative to the step -> size).

    Cheap (no data read): catches missing and truncated or grown objects. Objects present in
    storage but not in the manifest are ignored: they are not part of the checkpoint.
    """
    problems = []
    for record in manifest.objects:
        size = listed_sizes.get(record.path)
        if size is None:
            problems.append(ObjectProblem(record.path, "missing"))
        elif size != record.size:
            problems.append(
                ObjectProblem(record.path, f"size {size} differs from the recorded {record.size}")
            )
    return problems


def validate_objects(step: int, world_size: int, objects: Iterable[ObjectRecord]) -> list[str]:
    """Sanity checks before committing: DCP's metadata present, no duplicate paths.

    Returns problems as sentences (empty when the set is committable).
    """
    paths = [record.path for record in objects]
    problems = []
    if ".metadata" not in paths:
        problems.append(f"step {step}: DCP's .metadata was not written")
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    if duplicates:
        problems.append(f"step {step}: objects written twice: {', '.join(duplicates)}")
    if world_size < 1:
        problems.append(f"step {step}: world size {world_size} < 1")
    return problems
