"""Reused transfer buffers: the memory bound of checkpoint uploads and local writes."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B", bytearray, mmap.mmap)


class BufferPool(Generic[B]):
    """At most `capacity` buffers of `size` bytes, made on first use by `make` and reused
    forever after: memory stays at most ``size * capacity`` and flat across saves (no
    allocation per part). `acquire` waits for a free buffer (S3 uploads: back-pressure);
    `try_acquire` does not (a local writer that finds none writes buffered instead)."""

    def __init__(self, size: int, capacity: int, make: Callable[[int], B]) -> None:
        self.size = size
        self.capacity = capacity
        self._make: Callable[[int], B] = make
        self._free: list[B] = []
        self._allocated = 0
        self._condition = threading.Condition()

    def acquire(self) -> B:
        """A free or new buffer; blocks while all `capacity` are in use."""
        while (buffer := self.try_acquire()) is None:
            with self._condition:
                while not self._free and self._allocated >= self.capacity:
                    self._condition.wait()
        return buffer

    def try_acquire(self) -> B | None:
        """A free buffer, a new one within `capacity`, or None."""
        with self._condition:
            if self._free:
                return self._free.pop()
            if self._allocated >= self.capacity:
                return None
            self._allocated += 1
        return self._make(self.size)

    def reserve(self, count: int) -> None:
        """Make buffers up front until `count` exist (within `capacity`), so host memory
        reaches its steady state at once instead of creeping up a buffer at a time whenever
        a later transfer happens to have one more in flight."""
        while True:
            with self._condition:
                if self._allocated >= min(count, self.capacity):
                    return
                self._allocated += 1
            self.release(self._make(self.size))

    def release(self, buffer: B) -> None:
        with self._condition:
            self._free.append(buffer)
            self._condition.notify()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated * self.size
