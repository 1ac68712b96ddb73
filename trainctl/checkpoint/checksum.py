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

Every object gets a whole-object checksum plus one checksum per block of `block_size` bytes;
one CRC pass computes the blocks, and the whole-object CRC is combined from them (zlib's
`crc32_combine` method, in GF(2): microseconds per block).
Block checksums let a resharding restore, which reads only byte ranges of a shard, verify
exactly the blocks it read without downloading the whole object.
"""

from __future__ import annotations

import functools
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


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[row]) for row in range(32)]


@functools.lru_cache(maxsize=16)
def crc32_shift_operator(length: int) -> list[int]:
    """The GF(2) operator that appends `length` zero bytes to a CRC-32 state (zlib's
    ``crc32_combine`` method): with it, ``crc(A + B) = apply(op_len(B), crc(A)) ^ crc(B)``."""
    result = [1 << row for row in range(32)]  # identity
    odd = [0xEDB88320] + [1 << row for row in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits: the operator for one zero byte is next
    while length:
        even = _gf2_square(odd)
        if length & 1:
            result = [_gf2_times(even, column) for column in result]
        length >>= 1
        if not length:
            break
        odd = _gf2_square(even)
        if length & 1:
            result = [_gf2_times(odd, column) for column in result]
        length >>= 1
    return result


def crc32_combine(crc_a: int, crc_b: int, operator: list[int]) -> int:
    """CRC-32 of A + B from the CRCs of both and `crc32_shift_operator(len(B))`."""
    return _gf2_times(operator, crc_a) ^ crc_b


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
        self._blocks: list[int] = []

    def update(self, data: BytesLike) -> None:
        """Feed the next bytes of the stream."""
        # One pass: block CRCs only; the whole-object CRC is combined from them (`whole`).
        view = memoryview(data).cast("B")
        self.size += len(view)
        while len(view):
            take = min(len(view), self.block_size - self._block_filled)
            self._block = zlib.crc32(view[:take], self._block)
            self._block_filled += take
            view = view[take:]
            if self._block_filled == self.block_size:
                self._blocks.append(self._block & 0xFFFFFFFF)
                self._whole = crc32_combine(
                    self._whole, self._blocks[-1], crc32_shift_operator(self.block_size)
                )
                self._block, self._block_filled = 0, 0

    def prefix(self) -> str | None:
        """The checksum of everything fed so far while that is within the first block (one
        running CRC, no combining); None after the first block completed."""
        return None if self._blocks else format_checksum(self._block)

    def block_crc(self, index: int) -> int:
        """The CRC-32 of block `index` (the partial last block included) as an integer."""
        if index < len(self._blocks):
            return self._blocks[index]
        if index == len(self._blocks) and self._block_filled:
            return self._block & 0xFFFFFFFF
        raise IndexError(f"block {index} is not complete (have {len(self._blocks)})")

    def whole(self) -> str:
        """The checksum of everything fed so far."""
        if not self._block_filled:
            return format_checksum(self._whole)
        tail = crc32_shift_operator(self._block_filled)
        return format_checksum(crc32_combine(self._whole, self._block, tail))

    def blocks(self) -> list[str]:
        """Block checksums of everything fed so far (the partial last block included)."""
        tail = [self._block] if self._block_filled else []
        return [format_checksum(value) for value in [*self._blocks, *tail]]
