"""The local-file backend of the checkpoint storage seam: temporary name, fsync, rename;
mmap reads verified block by block."""

from __future__ import annotations

import mmap
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainctl.checkpoint.buffers import BufferPool
from trainctl.checkpoint.checksum import BytesLike
from trainctl.checkpoint.local_writer import (
    DIRECT_ALIGNMENT,
    TEMPORARY_MARK,
    WRITE_CHUNK,
    LocalWriter,
    fsync_dir,
    prefaulted,
)
from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.checkpoint.storage import (
    CorruptObjectError,
    ObjectWriter,
    SpanRead,
    Storage,
    TransferConfig,
    WrittenObject,
)


class LocalStorage(Storage):
    """Plain files under a directory."""

    def __init__(self, root: str, config: TransferConfig) -> None:
        super().__init__(os.path.abspath(root) if root else root, config)
        # Buffers of at most WRITE_CHUNK; as many as ``part_size * concurrency`` allows (the
        # memory bound the S3 part pool has too).
        size = -(-min(config.part_size, WRITE_CHUNK) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        count = max(1, config.part_size * config.concurrency // size)
        self.write_buffers: BufferPool[mmap.mmap] = BufferPool(size, count, prefaulted)
        self._io: ThreadPoolExecutor | None = None
        self._io_lock = threading.Lock()

    def io_executor(self) -> ThreadPoolExecutor:
        """The threads that write full buffers (started on first use)."""
        with self._io_lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(
                    self.config.concurrency, thread_name_prefix="trainctl-local-write"
                )
            return self._io

    def close(self) -> None:
        with self._io_lock:
            io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def open_writer(self, key: str) -> ObjectWriter:
        return LocalWriter(self, self._path(key), key)

    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        path = self._path(key)
        writer = LocalWriter(self, path + ".put", key)
        writer.write(data)
        written = writer.close()
        if not exclusive:
            os.replace(path + ".put", path)
            return written
        try:
            os.link(path + ".put", path)  # atomic create-exclusive: fails if `path` exists
        finally:
            os.unlink(path + ".put")
        fsync_dir(os.path.dirname(path))
        return written

    def read_span(self, key: str, start: int, end: int, record: ObjectRecord | None) -> SpanRead:
        # Mapped at once; verified block by block as the reader reaches it (the block is then
        # hot in the CPU cache for deserialisation, and no pass over the whole span comes first).
        first, view = self._map(key, start, end, record)
        step = record.block_size if record else max(1, len(view))
        chunks: list[tuple[int, int, Future[None] | None]] = [
            (offset, min(offset + step, first + len(view)), None)
            for offset in range(first, first + len(view), step)
        ]
        return SpanRead(key, first, view, chunks, record)

    def _map(
        self, key: str, start: int, end: int | None, record: ObjectRecord | None
    ) -> tuple[int, memoryview]:
        """The object offset and mapping of ``[start, end)``, widened to whole blocks with a
        `record` (whose size is checked)."""
        # mmap, not read(): the bytes stay in the page cache (no zero-filled buffer, no copy);
        # checksums and DCP's deserialisation read them in place. Files are never truncated in
        # place (writes go to a temporary name and are renamed; deletes unlink), so the mapping
        # cannot lose its pages under a reader.
        with open(self._path(key), "rb") as handle:  # FileNotFoundError when absent
            size = os.fstat(handle.fileno()).st_size
            if record is not None and size != record.size:
                raise CorruptObjectError(key, [f"size {size} != recorded {record.size}"])
            end = size if end is None else min(end, size)
            first, last = record.block_range(start, end) if record else (start, end)
            last = min(last, size)
            # Map only the span; MAP_POPULATE faults it in with one call instead of a page fault
            # per 4 KiB when checksums and DCP touch it.
            base = first - first % mmap.ALLOCATIONGRANULARITY
            mapped: Any = (
                mmap.mmap(
                    handle.fileno(),
                    last - base,
                    flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                    prot=mmap.PROT_READ,
                    offset=base,
                )
                if last > base
                else b""
            )
        return first, memoryview(mapped)[first - base : last - base]

    def size(self, key: str) -> int | None:
        try:
            return os.path.getsize(self._path(key))
        except FileNotFoundError:
            return None

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix)
        found: dict[str, int] = {}
        if os.path.isfile(base):
            return {prefix: os.path.getsize(base)}
        for directory, _, files in os.walk(base):
            for name in files:
                full = os.path.join(directory, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                try:
                    found[key] = os.path.getsize(full)
                except FileNotFoundError:
                    continue  # deleted while listing
        return found

    def list_dirs(self, prefix: str = "") -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as entries:
                return sorted(entry.name for entry in entries if entry.is_dir())
        except FileNotFoundError:
            return []

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def is_temporary(self, key: str) -> bool:
        name = key.rsplit("/", 1)[-1]
        return TEMPORARY_MARK in name or name.endswith(".put")

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix)
        count = len(self.list_objects(prefix))
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
        return count

    def rename(self, key: str, new_key: str) -> None:
        os.replace(self._path(key), self._path(new_key))
        fsync_dir(os.path.dirname(self._path(new_key)))

    def make_dirs(self, key: str) -> None:
        os.makedirs(self._path(key), exist_ok=True)


# ------------------------------------------------------------------------------------------ S3
