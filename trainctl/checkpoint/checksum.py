"""Checksums of checkpoint objects, computed while bytes stream through (pure: no I/O).

Algorithm: CRC-32 (IEEE) from the standard library's `zlib.crc32`. Why this one:

* fast enough to be free: about 7 GB/s on one core of the build machine, an order of magnitude
  above any storage rate we reach (blake2b: 1.3 GB/s; google-crc32c: 13 GB/s but an extra
  dependency whose `Checksum.update` refuses memoryviews, so it would force copies);
* it releases the GIL for large buffers, so checksumming in the upload thread does not stall
  the training thread (measured: two threads finish in half the time of one);
* it accepts any buffer (bytes, bytearray, memoryview) without copying;
* S3 knows it natively (``x-amz-checksum-crc32``), so a later version can hand the same value
  to the server for end-to-end verification.

It detects corruption and truncation, not tampering; that is the threat model here.

Every object gets a whole-object checksum plus one checksum per block of `block_size` bytes.
Block checksums let a resharding restore, which reads only byte ranges of a shard, verify
exactly the blocks it read without downloading the whole object.
"""

from __future__ import annotations

import zlib
from typing import TypeAlias

BytesLike: TypeAlias = bytes | bytearray | memoryview

ALGORITHM = "crc32"


def format_checksum(value: int) -> str:
    """The manifest's text form of a CRC: ``crc32:0a1b2c3d``."""
    return f"{ALGORITHM}:{value & 0xFFFFFFFF:08x}"


def checksum_of(data: BytesLike) -> str:
    """The checksum of one buffer, in manifest form."""
    return format_checksum(zlib.crc32(data))


class StreamingChecksum:
    """Whole-object and per-block CRCs of a byte stream fed in order through `update`.

    Blocks are aligned to offset 0 of the object: block ``i`` covers bytes
    ``[i * block_size, (i + 1) * block_size)``; the last block may be shorter.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.size = 0
        self._whole = 0
        self._block = 0
        self._block_filled = 0
        self._blocks: list[str] = []

    def update(self, data: BytesLike) -> None:
        """Feed the next bytes of the stream."""
        view = memoryview(data).cast("B")
        self._whole = zlib.crc32(view, self._whole)
        self.size += len(view)
        while len(view):
            take = min(len(view), self.block_size - self._block_filled)
            self._block = zlib.crc32(view[:take], self._block)
            self._block_filled += take
            view = view[take:]
            if self._block_filled == self.block_size:
                self._blocks.append(format_checksum(self._block))
                self._block, self._block_filled = 0, 0

    def whole(self) -> str:
        """The checksum of everything fed so far."""
        return format_checksum(self._whole)

    def blocks(self) -> list[str]:
        """Block checksums of everything fed so far (the partial last block included)."""
        tail = [format_checksum(self._block)] if self._block_filled else []
        return [*self._blocks, *tail]
