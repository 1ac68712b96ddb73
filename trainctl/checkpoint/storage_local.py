"""The local-file backend of the checkpoint storage seam: temporary name, fsync, rename;
mmap reads verified block by block."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
import uuid
from concurrent.futures import Future
from typing import Any

from trainctl.checkpoint.checksum import BytesLike
from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.checkpoint.storage import (
    CorruptObjectError,
    ObjectWriter,
    SpanRead,
    Storage,
    TransferConfig,
    WrittenObject,
)

# ---------------------------------------------------------------------------------- local files


class _LocalWriter(ObjectWriter):
    def __init__(self, path: str, key: str, block_size: int) -> None:
        super().__init__(key, block_size)
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Same directory, unique name: the rename below is atomic and never crosses devices.
        self._tmp_path = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 (closed in _finish/_discard)
        self._block_size = block_size
        self._flushed = 0

    def _write(self, view: memoryview) -> None:
        self._file.write(view)
        written = self._checksum.size
        if written - self._flushed >= self._block_size:
            # Start writeback of what is written so far without waiting for it, so the fsync in
            # `close` finds most pages already on their way to disk instead of all of them.
            self._file.flush()
            _start_writeback(self._file.fileno(), self._flushed, written - self._flushed)
            self._flushed = written

    def _finish(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path, self._path)
            _fsync_dir(os.path.dirname(self._path))
        except BaseException:
            self._aborted = True
            self._discard()
            raise

    def _discard(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp_path):
            os.unlink(self._tmp_path)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: queue dirty pages for writeback and
    return at once (no durability by itself; `close` still fsyncs). No-op elsewhere."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                function = libc.sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                _sync_file_range = function
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """Plain files under a directory."""

    def __init__(self, root: str, config: TransferConfig) -> None:
        super().__init__(os.path.abspath(root) if root else root, config)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def open_writer(self, key: str) -> ObjectWriter:
        return _LocalWriter(self._path(key), key, self.config.part_size)

    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        path = self._path(key)
        writer = _LocalWriter(path + ".put", key, self.config.part_size)
        writer.write(data)
        written = writer.close()
        if not exclusive:
            os.replace(path + ".put", path)
            return written
        try:
            os.link(path + ".put", path)  # atomic create-exclusive: fails if `path` exists
        finally:
            os.unlink(path + ".put")
        _fsync_dir(os.path.dirname(path))
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
        _fsync_dir(os.path.dirname(self._path(new_key)))

    def make_dirs(self, key: str) -> None:
        os.makedirs(self._path(key), exist_ok=True)


# ------------------------------------------------------------------------------------------ S3
