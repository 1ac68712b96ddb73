"""The storage seam: objects under a root URL, moved at the storage's speed, checksummed in flight.

Two backends behind one small interface (`Storage`), chosen by the root URL:

* a plain path or ``file://``: files written under a temporary name, fsynced, renamed into
  place (a reader never sees half a file under its final name);
* ``s3://bucket/prefix`` (and S3-compatible endpoints): each object is a **concurrent multipart
  upload** (parts of `part_size` bytes, at most `concurrency` part buffers alive, reused across
  objects and saves, so memory is bounded by ``part_size * concurrency``) and reads are
  **concurrent ranged GETs**. s3fs uploads a file's parts one at a time; this is why trainctl
  does not write through ``fs.open(..., "wb")``.

Keys are relative to the root and always use ``/``. URLs stay strings (``pathlib`` collapses
``s3://``) and fsspec/s3fs are imported only when an ``s3://`` root is opened.

Every write computes the object's CRC-32 and per-block CRCs while the bytes stream through
(`WrittenObject`); every read can verify against a manifest record (`read(..., record=)`).

S3 calls are retried with exponential backoff on transient errors (connection refused, timeouts,
5xx/SlowDown); "not found", "exists" and permission errors are not retried.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import mmap
import os
import random
import shutil
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from trainctl.checkpoint.checksum import BytesLike, StreamingChecksum
from trainctl.checkpoint.layout import join
from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.errors import StorageError

MIB = 1 << 20
S3_MIN_PART_SIZE = 5 * MIB
"""S3 rejects non-final multipart parts smaller than 5 MiB."""
S3_MAX_PARTS = 10_000

T = TypeVar("T")


class CorruptObjectError(StorageError):
    """Bytes read back do not match the checksums (or size) recorded when they were written."""

    def __init__(self, key: str, problems: list[str]) -> None:
        self.key = key
        self.problems = problems
        super().__init__(f"{key}: " + "; ".join(problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # DCP pickles a rank's exception to every rank: keep it reconstructible.
        return (type(self), (self.key, self.problems))


@dataclass(frozen=True)
class TransferConfig:
    """How objects move between memory and storage."""

    part_size: int = 64 * MIB
    """Bytes per multipart part / ranged read, and the checksum block size of new objects."""
    concurrency: int = 8
    """Part buffers alive at once (uploads) and ranged GETs in flight (reads)."""
    max_attempts: int = 5
    """Attempts per S3 request before the operation fails."""
    backoff_s: float = 0.5
    """First retry delay; doubles per attempt (with jitter) up to `backoff_max_s`."""
    backoff_max_s: float = 8.0
    """Longest delay between two attempts."""

    def __post_init__(self) -> None:
        if self.part_size <= 0:
            raise ValueError(f"part_size must be > 0, got {self.part_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def retry_delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based): exponential with full jitter."""
        ceiling = min(self.backoff_max_s, self.backoff_s * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class WrittenObject:
    """An object as written: what the manifest records."""

    key: str
    size: int
    checksum: str
    block_size: int
    block_checksums: tuple[str, ...]

    def to_record(self, path: str, rank: int) -> ObjectRecord:
        """The manifest record, with `path` relative to the step directory."""
        return ObjectRecord(
            path=path,
            size=self.size,
            checksum=self.checksum,
            block_size=self.block_size,
            block_checksums=self.block_checksums,
            rank=rank,
        )


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: str


class ObjectWriter(ABC):
    """A write-once stream for one object. `close()` makes it durable; `abort()` discards it.

    Nothing is visible under the final key before `close()` returns. Not thread-safe: one writer
    per thread. There is deliberately no ``__del__``: an abandoned writer must never publish.
    """

    def __init__(self, key: str, block_size: int) -> None:
        self.key = key
        self._checksum = StreamingChecksum(block_size)
        self._result: WrittenObject | None = None
        self._aborted = False

    def write(self, data: BytesLike) -> int:
        """Append bytes; may block while earlier parts upload (back-pressure)."""
        if self._result is not None or self._aborted:
            raise ValueError(f"{self.key}: write after close/abort")
        view = memoryview(data).cast("B")
        self._checksum.update(view)
        self._write(view)
        return len(view)

    def tell(self) -> int:
        """Bytes written so far."""
        return self._checksum.size

    def flush(self) -> None:  # noqa: B027 (a stream method callers expect; nothing to do)
        """No-op: durability comes from `close()`."""

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._result is not None or self._aborted

    def close(self) -> WrittenObject:
        """Publish the object under its key (idempotent); returns its size and checksums."""
        if self._result is None:
            if self._aborted:
                raise ValueError(f"{self.key}: close after abort")
            self._finish()
            self._result = WrittenObject(
                key=self.key,
                size=self._checksum.size,
                checksum=self._checksum.whole(),
                block_size=self._checksum.block_size,
                block_checksums=tuple(self._checksum.blocks()),
            )
        return self._result

    def abort(self) -> None:
        """Discard everything written (best effort; idempotent; never raises)."""
        if self._result is None and not self._aborted:
            self._aborted = True
            try:
                self._discard()
            except Exception:
                pass  # GC removes what could not be discarded now

    @abstractmethod
    def _write(self, view: memoryview) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...

    @abstractmethod
    def _discard(self) -> None: ...


class Storage(ABC):
    """Objects under one root URL. Keys are relative to the root, ``/``-separated."""

    def __init__(self, root: str, config: TransferConfig) -> None:
        self.root = root.rstrip("/")
        self.config = config

    def url(self, key: str) -> str:
        """The full URL/path of `key`."""
        return join(self.root, key)

    def key_of(self, url: str) -> str:
        """The key of a full URL/path under this root (inverse of `url`)."""
        if url != self.root and not url.startswith(self.root + "/"):
            raise ValueError(f"{url!r} is not under the storage root {self.root!r}")
        return url[len(self.root) :].lstrip("/")

    @abstractmethod
    def open_writer(self, key: str) -> ObjectWriter:
        """A writer for a new object at `key` (replaces an existing object on close)."""

    @abstractmethod
    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        """Write a small object in one call. `exclusive`: raise FileExistsError if it exists
        (atomically where the backend can: ``link`` locally, ``If-None-Match: *`` on S3)."""

    @abstractmethod
    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        """Bytes ``[start, end)`` of `key` (`end` None: to the end).

        With a `record`, the size is checked and the covering blocks are read and verified; a
        mismatch raises CorruptObjectError. Raises
        FileNotFoundError when the object does not exist.
        """

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size of `key`, or None when it does not exist."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` (recursively): key -> size. Fresh, never cached."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-directories of `prefix`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object (no error if absent)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under `prefix`; returns the number of objects deleted."""

    @abstractmethod
    def rename(self, key: str, new_key: str) -> None:
        """Move an object (atomic locally; copy then delete on S3)."""

    def make_dirs(self, key: str) -> None:  # noqa: B027 (optional: no-op default)
        """Create the directory `key` where the backend has directories (no-op on S3)."""

    def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Multipart uploads started under `prefix` and never completed nor aborted."""
        return []

    def abort_upload(self, upload: PendingUpload) -> None:  # noqa: B027 (optional: no-op default)
        """Abort one multipart upload (frees the parts it holds)."""

    def close(self) -> None:  # noqa: B027 (optional: no-op default)
        """Release threads and buffers."""

    def _verify(self, key: str, offset: int, data: memoryview, record: ObjectRecord) -> None:
        # Blocks cover every byte, so one pass suffices; the whole-object checksum is checked by
        # `trainctl ckpt verify` (inspect.verify_in), which reads whole objects anyway.
        problems = record.verify_range(offset, data)
        if problems:
            raise CorruptObjectError(key, problems)


def open_storage(
    root: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: TransferConfig | None = None,
) -> Storage:
    """Open the backend for `root`: a plain path, ``file://...`` or ``s3://bucket/prefix``.

    `storage_options` go to s3fs (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``...);
    without them the standard AWS chain applies (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    profiles). Raises ValueError for any other scheme.
    """
    config = config or TransferConfig()
    if root.startswith("s3://"):
        return S3Storage(root, config, dict(storage_options or {}))
    if root.startswith("file://"):
        return LocalStorage(root[len("file://") :], config)
    if "://" in root:
        raise ValueError(f"unsupported storage URL {root!r}: use a path, file:// or s3://")
    return LocalStorage(root, config)


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

    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        # mmap, not read(): the bytes stay in the page cache (no zero-filled buffer, no copy);
        # checksums and DCP's deserialisation read them in place. Files are never truncated in
        # place (writes go to a temporary name and are renamed; deletes unlink), so the mapping
        # cannot lose its pages under a reader.
        with open(self._path(key), "rb") as handle:  # FileNotFoundError when absent
            size = os.fstat(handle.fileno()).st_size
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
        view = memoryview(mapped)[first - base : last - base]
        if record is not None:
            if size != record.size:
                raise CorruptObjectError(key, [f"size {size} != recorded {record.size}"])
            self._verify(key, first, view, record)
        return view[start - first : end - first]

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


class _BufferPool:
    """At most `capacity` part buffers, allocated on first use and reused forever after.

    This is what bounds upload memory to ``part_size * capacity`` and keeps it flat across
    saves (no allocation per part, no growth).
    """

    def __init__(self, part_size: int, capacity: int) -> None:
        self.part_size = part_size
        self.capacity = capacity
        self._free: list[bytearray] = []
        self._allocated = 0
        self._condition = threading.Condition()

    def acquire(self) -> bytearray:
        with self._condition:
            while not self._free and self._allocated >= self.capacity:
                self._condition.wait()
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return bytearray(self.part_size)

    def release(self, buffer: bytearray) -> None:
        with self._condition:
            self._free.append(buffer)
            self._condition.notify()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated * self.part_size


def _is_retryable(error: BaseException) -> bool:
    if isinstance(
        error,
        FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError | ValueError,
    ):
        return False
    if isinstance(error, OSError | asyncio.TimeoutError | TimeoutError):
        return True
    # botocore errors that s3fs did not translate (connection, read timeouts, 5xx)
    module = type(error).__module__
    return module.startswith(("botocore", "aiobotocore", "aiohttp"))


class _S3Writer(ObjectWriter):
    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__(key, storage.config.part_size)
        self._storage = storage
        self._bucket, self._s3_key = storage.bucket_key(key)
        self._buffer: bytearray | None = None
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []

    def _write(self, view: memoryview) -> None:
        part_size = self._storage.config.part_size
        while len(view):
            if self._buffer is None:
                self._buffer = self._storage.buffers.acquire()  # blocks: bounded memory
                self._filled = 0
            take = min(len(view), part_size - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == part_size:
                self._send_part()

    def _send_part(self) -> None:
        assert self._buffer is not None
        self._raise_failed_part()
        if self._upload_id is None:
            response = self._storage.call(
                "create_multipart_upload", Bucket=self._bucket, Key=self._s3_key
            )
            self._upload_id = str(response["UploadId"])
        if len(self._parts) >= S3_MAX_PARTS:
            raise StorageError(f"{self.key}: more than {S3_MAX_PARTS} parts; raise part_size")
        buffer, filled = self._buffer, self._filled
        self._buffer, self._filled = None, 0
        number = len(self._parts) + 1
        # Parts are aligned with checksum blocks (block size == part size), so the part's CRC-32
        # is the block just completed: S3 checks it on arrival (x-amz-checksum-crc32) and
        # botocore does not compute it again.
        # (`write` feeds the checksum before `_write`, so the block is complete here.)
        crc = self._checksum.block_crc(number - 1)
        body_view = memoryview(buffer)[:filled]
        storage = self._storage

        async def upload() -> Any:
            return await storage.call_async(
                "upload_part",
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                PartNumber=number,
                ChecksumCRC32=base64.b64encode(crc.to_bytes(4, "big")).decode(),
                # A fresh body per attempt: streamed from the pooled buffer in slices.
                body_factory=lambda: _part_body(body_view),
            )

        future = storage.submit(upload)
        future.add_done_callback(lambda _: self._storage.buffers.release(buffer))
        self._parts.append(future)

    def _raise_failed_part(self) -> None:
        for future in self._parts:
            if future.done() and future.exception() is not None:
                raise StorageError(f"{self.key}: part upload failed") from future.exception()

    def _finish(self) -> None:
        try:
            if self._upload_id is None:
                data = bytes(memoryview(self._buffer)[: self._filled]) if self._buffer else b""
                self._release_buffer()
                self._storage.call("put_object", Bucket=self._bucket, Key=self._s3_key, Body=data)
                return
            if self._filled:
                self._send_part()
            self._release_buffer()
            etags = []
            for number, future in enumerate(self._parts, start=1):
                response = future.result()
                etags.append({"PartNumber": number, "ETag": response["ETag"]})
            self._storage.call(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": etags},
            )
        except BaseException:
            self._aborted = True
            self._discard()
            raise

    def _release_buffer(self) -> None:
        if self._buffer is not None:
            self._storage.buffers.release(self._buffer)
            self._buffer = None

    def _discard(self) -> None:
        self._release_buffer()
        for future in self._parts:
            try:
                future.result()  # parts still running hold pooled buffers: let them finish
            except Exception:
                pass
        if self._upload_id is not None:
            self._storage.call(
                "abort_multipart_upload",
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                attempts=1,
            )


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix`` through s3fs's async client (aiobotocore).

    Requests run on fsspec's I/O event loop, so concurrency costs no threads: part uploads and
    ranged reads are coroutines scheduled there from whichever thread writes or reads.
    """

    def __init__(self, root: str, config: TransferConfig, storage_options: dict[str, Any]) -> None:
        super().__init__(root, config)
        if config.part_size < S3_MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be >= {S3_MIN_PART_SIZE} bytes on S3 (S3's minimum part size), "
                f"got {config.part_size}"
            )
        import s3fs  # lazily: local-only users never import the S3 stack

        self._bucket, _, self._prefix = root[len("s3://") :].partition("/")
        self._prefix = self._prefix.strip("/")
        if not self._bucket:
            raise ValueError(f"no bucket in {root!r}")
        options = dict(storage_options)
        # One retry policy, ours (TransferConfig): botocore and s3fs would otherwise each retry
        # on top of it and turn an outage into minutes of silent waiting.
        config_kwargs = dict(options.pop("config_kwargs", None) or {})
        config_kwargs.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        # skip_instance_cache: each Storage owns its client, so closing one never breaks another.
        self.fs = s3fs.S3FileSystem(
            skip_instance_cache=True, config_kwargs=config_kwargs, **options
        )
        self.fs.retries = 1
        self.buffers = _BufferPool(config.part_size, config.concurrency)
        self._read_limit: asyncio.Semaphore | None = None

    def bucket_key(self, key: str) -> tuple[str, str]:
        """The bucket and full object key of `key`."""
        return self._bucket, join(self._prefix, key)

    # -- request plumbing

    async def call_async(self, method: str, *, attempts: int | None = None, **kwargs: Any) -> Any:
        """One S3 request with retries and backoff on transient errors (on the I/O loop)."""
        attempts = attempts or self.config.max_attempts
        body_factory = kwargs.pop("body_factory", None)
        for attempt in range(1, attempts + 1):
            try:
                if body_factory is not None:
                    kwargs["Body"] = body_factory()
                return await self.fs._call_s3(method, **kwargs)
            except Exception as error:
                if attempt == attempts or not _is_retryable(error):
                    raise
                await asyncio.sleep(self.config.retry_delay(attempt))
        raise AssertionError("unreachable")

    def call(self, method: str, *, attempts: int | None = None, **kwargs: Any) -> Any:
        """`call_async` from a normal thread (blocks until the request finished)."""
        return self.submit(lambda: self.call_async(method, attempts=attempts, **kwargs)).result()

    def submit(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        """Schedule a coroutine on the I/O loop; returns a thread-safe future."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.fs.loop)

    # -- objects

    def open_writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self, key)

    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        summer = StreamingChecksum(self.config.part_size)
        summer.update(data)
        bucket, s3_key = self.bucket_key(key)
        body = bytes(data)
        if exclusive:
            # If-None-Match: * makes the create atomic on S3 (412 -> FileExistsError).
            self.call("put_object", Bucket=bucket, Key=s3_key, Body=body, IfNoneMatch="*")
        else:
            self.call("put_object", Bucket=bucket, Key=s3_key, Body=body)
        return WrittenObject(
            key, summer.size, summer.whole(), summer.block_size, tuple(summer.blocks())
        )

    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        size = self.size(key)
        if size is None:
            raise FileNotFoundError(self.url(key))
        end = size if end is None else min(end, size)
        first, last = record.block_range(start, end) if record else (start, end)
        last = min(last, size)
        buffer = bytearray(max(0, last - first))
        view = memoryview(buffer)
        chunk = record.block_size if record else self.config.part_size
        ranges = [(o, min(o + chunk, last)) for o in range(first, last, chunk)]
        bucket, s3_key = self.bucket_key(key)
        self.submit(lambda: self._read_ranges(bucket, s3_key, ranges, view, first)).result()
        if record is not None:
            if size != record.size:
                raise CorruptObjectError(key, [f"size {size} != recorded {record.size}"])
            self._verify(key, first, view, record)
        return view[start - first : end - first]

    async def _read_ranges(
        self, bucket: str, s3_key: str, ranges: list[tuple[int, int]], view: memoryview, base: int
    ) -> None:
        limit = asyncio.Semaphore(self.config.concurrency)

        async def fetch(byte_range: tuple[int, int]) -> None:
            start, end = byte_range
            async with limit:
                response = await self.call_async(
                    "get_object", Bucket=bucket, Key=s3_key, Range=f"bytes={start}-{end - 1}"
                )
                got = await _read_body_into(response["Body"], view[start - base : end - base])
            if got != end - start:
                raise CorruptObjectError(s3_key, [f"range {start}..{end} returned {got} bytes"])

        await asyncio.gather(*(fetch(r) for r in ranges))

    def size(self, key: str) -> int | None:
        bucket, s3_key = self.bucket_key(key)
        try:
            response = self.call("head_object", Bucket=bucket, Key=s3_key)
        except FileNotFoundError:
            return None
        return int(response["ContentLength"])

    def _list_pages(self, prefix: str, delimiter: str | None) -> list[dict[str, Any]]:
        bucket, s3_prefix = self.bucket_key(prefix)
        s3_prefix = s3_prefix + "/" if s3_prefix else ""
        pages, token = [], None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": s3_prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call("list_objects_v2", **kwargs)
            pages.append(page)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return pages

    def _relative(self, s3_key: str) -> str:
        return s3_key[len(self._prefix) :].lstrip("/") if self._prefix else s3_key

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        found = {}
        for page in self._list_pages(prefix, None):
            for item in page.get("Contents", []):
                found[self._relative(item["Key"])] = int(item["Size"])
        return found

    def list_dirs(self, prefix: str = "") -> list[str]:
        names = []
        for page in self._list_pages(prefix, "/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def delete(self, key: str) -> None:
        bucket, s3_key = self.bucket_key(key)
        self.call("delete_object", Bucket=bucket, Key=s3_key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_objects(prefix))
        bucket = self._bucket
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.bucket_key(key)[1]} for key in keys[start : start + 1000]]
            self.call("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def rename(self, key: str, new_key: str) -> None:
        bucket, source = self.bucket_key(key)
        _, target = self.bucket_key(new_key)
        self.call(
            "copy_object", Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source}
        )
        self.call("delete_object", Bucket=bucket, Key=source)

    def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        bucket, s3_prefix = self.bucket_key(prefix)
        uploads: list[PendingUpload] = []
        markers: dict[str, Any] = {}
        while True:
            page = self.call("list_multipart_uploads", Bucket=bucket, Prefix=s3_prefix, **markers)
            for item in page.get("Uploads", []):
                uploads.append(
                    PendingUpload(
                        key=self._relative(item["Key"]),
                        upload_id=item["UploadId"],
                        initiated=str(item.get("Initiated", "")),
                    )
                )
            if not page.get("IsTruncated"):
                return uploads
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    def abort_upload(self, upload: PendingUpload) -> None:
        bucket, s3_key = self.bucket_key(upload.key)
        try:
            self.call(
                "abort_multipart_upload", Bucket=bucket, Key=s3_key, UploadId=upload.upload_id
            )
        except FileNotFoundError:
            pass  # already completed or aborted by someone else


STREAM_SLICE = 1 * MIB
"""Bytes handed to the HTTP connection (upload) or taken from it (download) per step."""


async def _read_body_into(body: Any, target: memoryview) -> int:
    """Copy a response body into `target` slice by slice; returns the bytes received.

    ``await body.read()`` would join the whole range into one new bytes object first: a
    part-sized allocation per request (and fragmentation) on top of the destination buffer.
    """
    filled = 0
    try:
        while True:
            chunk = await body.read(STREAM_SLICE)
            if not chunk:
                return filled
            if filled + len(chunk) > len(target):
                return filled + len(chunk)  # longer than asked: reported as a size mismatch
            target[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    finally:
        body.close()


_PART_BODY: Any = None


def _part_body(view: memoryview) -> Any:
    """An upload body that streams `view` to the connection in `STREAM_SLICE` slices.

    With a bytes/bytearray body, aiohttp writes the whole part in one call: on Python < 3.12.9
    it first joins headers and body (a part-sized copy), and asyncio's transport then copies
    whatever the socket did not take at once into its own buffer (another part-sized copy).
    That is up to two transient part copies per request in flight, outside the bounded buffer
    pool, and a source of malloc fragmentation (RSS growth save after save). Streaming slices
    with a drain after each keeps the connection's buffer at about one slice.

    The class is an aiohttp `Payload` (aiohttp sends it as is) that is also a seekable
    file-like object (botocore takes its length and, over plain HTTP, reads it for the SigV4
    payload hash). Built lazily: aiohttp is imported only when S3 is used.
    """
    global _PART_BODY
    if _PART_BODY is None:
        from aiohttp.payload import Payload

        class PartBody(Payload):
            def __init__(self, data: memoryview) -> None:
                super().__init__(data, content_type="application/octet-stream")
                self._data = data
                self._size = len(data)
                self._position = 0

            def __len__(self) -> int:
                return len(self._data)

            def read(self, size: int = -1) -> bytes:
                end = len(self._data) if size < 0 else self._position + size
                chunk = bytes(self._data[self._position : end])
                self._position += len(chunk)
                return chunk

            def seek(self, offset: int, whence: int = 0) -> int:
                base = {0: 0, 1: self._position, 2: len(self._data)}[whence]
                self._position = max(0, base + offset)
                return self._position

            def tell(self) -> int:
                return self._position

            def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
                return bytes(self._data).decode(encoding, errors)

            async def write(self, writer: Any) -> None:
                await self.write_with_length(writer, None)

            async def write_with_length(self, writer: Any, content_length: int | None) -> None:
                end = len(self._data) if content_length is None else content_length
                for offset in range(0, end, STREAM_SLICE):
                    await writer.write(self._data[offset : min(offset + STREAM_SLICE, end)])

        _PART_BODY = PartBody
    return _PART_BODY(view)
