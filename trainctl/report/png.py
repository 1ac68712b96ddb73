"""A tiny PNG rasteriser: filled rectangles and vertical lines on an RGB canvas.

Enough to draw the goodput timeline without a plotting library: `Canvas` holds 8-bit RGB
pixels, `encode()` writes a standard PNG (IHDR, one zlib-compressed IDAT, IEND; filter type 0
on every row) with `zlib` and `struct` only. Pure: no I/O.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Color = tuple[int, int, int]


def parse_color(text: str) -> Color:
    """``#rrggbb`` → (r, g, b)."""
    value = text.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"expected a #rrggbb colour, got {text!r}")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


class Canvas:
    """A `width` × `height` RGB image filled with `background`; coordinates are clipped."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"canvas size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self._rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def fill_rect(self, x0: float, y0: float, x1: float, y1: float, color: Color) -> None:
        """Fill the pixels with x in [x0, x1) and y in [y0, y1), edges rounded to whole pixels
        (so rectangles that share an edge tile without gaps or overlaps)."""
        left, right = max(0, round(x0)), min(self.width, round(x1))
        top, bottom = max(0, round(y0)), min(self.height, round(y1))
        if left >= right or top >= bottom:
            return
        span = bytes(color) * (right - left)
        for row in self._rows[top:bottom]:
            row[left * 3 : right * 3] = span

    def vline(self, x: float, y0: float, y1: float, color: Color, width: int = 1) -> None:
        """A vertical line `width` pixels wide, centred on `x`, from `y0` to `y1`."""
        left = round(x - (width - 1) / 2)
        self.fill_rect(left, y0, left + width, y1, color)

    def pixel(self, x: int, y: int) -> Color:
        row = self._rows[y]
        return row[x * 3], row[x * 3 + 1], row[x * 3 + 2]

    def encode(self) -> bytes:
        """The image as PNG bytes (8-bit RGB, non-interlaced)."""
        raw = b"".join(b"\x00" + bytes(row) for row in self._rows)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            PNG_SIGNATURE
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
