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

import random
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainctl.checkpoint.checksum import BytesLike, StreamingChecksum
from trainctl.checkpoint.layout import join
from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.errors import StorageError

if TYPE_CHECKING:
    from trainctl.spec import CheckpointSpec

MIB = 1 << 20


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
    """How objects move between memory and storage (`transfer_config`: a recipe's)."""

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
    direct_io: bool = True
    """Local files: write through ``O_DIRECT`` from reused aligned buffers where the file
    system allows it (see `storage_local`); False: the page cache and an fsync."""
    give_up_s: float | None = None
    """S3: the connect and read timeout of one request, and no retry starts later than this
    after a request's first attempt: an unreachable endpoint fails within about this long
    (the CLI's $TRAINCTL_STORAGE_TIMEOUT_S). None: botocore's timeouts and `max_attempts`."""

    def __post_init__(self) -> None:
        if self.part_size <= 0:
            raise ValueError(f"part_size must be > 0, got {self.part_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.give_up_s is not None and not self.give_up_s > 0:
            raise ValueError(f"give_up_s must be > 0, got {self.give_up_s}")

    def retry_delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based): exponential with full jitter."""
        ceiling = min(self.backoff_max_s, self.backoff_s * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


def transfer_config(spec: CheckpointSpec) -> TransferConfig:
    """How a recipe's ``checkpoint:`` section moves bytes. Here, not in the checkpointer: the
    controller raises the checkpoint fence with it, and importing the checkpointer (torch)
    cost every job's first attempt ~1 s of startup."""
    return TransferConfig(
        part_size=spec.part_size_mb * MIB, concurrency=spec.concurrency, direct_io=spec.direct_io
    )


HEAD_BYTES = 1 * MIB
"""Most bytes an object's head may hold: a write that would take the object past this ends
the head before it, so DCP's small items (written first) make the head and the first large
tensor does not."""


@dataclass(frozen=True)
class WrittenObject:
    """An object as written: what the manifest records."""

    key: str
    size: int
    checksum: str
    block_size: int
    block_checksums: tuple[str, ...]
    head_size: int = 0
    head_checksum: str = ""

    def to_record(self, path: str, rank: int) -> ObjectRecord:
        """The manifest record, with `path` relative to the step directory."""
        return ObjectRecord(
            path=path,
            size=self.size,
            checksum=self.checksum,
            block_size=self.block_size,
            block_checksums=self.block_checksums,
            rank=rank,
            head_size=self.head_size,
            head_checksum=self.head_checksum,
        )


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: str


class SpanRead:
    """Bytes ``[first, last)`` of one object, fetched in the background in chunks.

    `ready(end)` blocks until ``[first, end)`` has arrived (and, with a manifest record, been
    verified), so a consumer can deserialise the front of a span while the rest downloads.
    `data` is the whole span's buffer; only the part `ready` returned for may be read.
    """

    def __init__(
        self,
        key: str,
        first: int,
        data: memoryview,
        chunks: list[tuple[int, int, Future[None] | None]],
        record: ObjectRecord | None,
    ) -> None:
        self.key = key
        self.first = first
        self.data = data
        self._chunks = chunks  # (start, end, fetch) in object offsets; None: already present
        self._record = record
        self._verified = first  # every byte before this one arrived and was verified
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def complete(cls, key: str, first: int, data: memoryview) -> SpanRead:
        """A span already in memory (and verified, if it had to be)."""
        span = cls(key, first, data, [], None)
        span._verified = first + len(data)
        return span

    @property
    def last(self) -> int:
        return self.first + len(self.data)

    def ready(self, end: int) -> None:
        """Block until bytes ``[first, end)`` are in `data` and verified; raise what a fetch
        raised (CorruptObjectError, FileNotFoundError, StorageError...)."""
        end = min(end, self.last)
        with self._lock:  # one verifier at a time; chunks are verified in order
            while self._verified < end:
                start, stop, fetch = self._chunks[self._next]
                if fetch is not None:
                    fetch.result()
                if self._record is not None:
                    view = self.data[start - self.first : stop - self.first]
                    problems = self._record.verify_range(start, view)
                    if problems:
                        raise CorruptObjectError(self.key, problems)
                self._verified = stop
                self._next += 1

    def cancel(self) -> None:
        """Stop fetching what has not arrived (a reader gave up on the span)."""
        for _, _, fetch in self._chunks:
            if fetch is not None:
                fetch.cancel()


class ObjectWriter(ABC):
    """A write-once stream for one object. `close()` makes it durable; `abort()` discards it.

    Nothing is visible under the final key before `close()` returns. Not thread-safe: one writer
    per thread. There is deliberately no ``__del__``: an abandoned writer must never publish.
    """

    def __init__(self, key: str, block_size: int) -> None:
        self.key = key
        self._checksum = StreamingChecksum(block_size)
        # Blocks no larger than a head need none: (0, "") marks "decided, no head".
        self._head: tuple[int, str] | None = None if block_size > HEAD_BYTES else (0, "")
        self._result: WrittenObject | None = None
        self._aborted = False
        self.before_publish: Callable[[], None] | None = None
        """Called by `close` before the object is published: may block, and raises to keep
        it unpublished (the caller then aborts)."""

    def write(self, data: BytesLike) -> int:
        """Append bytes; may block while earlier parts upload (back-pressure)."""
        if self._result is not None or self._aborted:
            raise ValueError(f"{self.key}: write after close/abort")
        view = memoryview(data).cast("B")
        if self._head is None and self._checksum.size + len(view) > HEAD_BYTES:
            # The last write boundary before HEAD_BYTES ends the head (see ObjectRecord).
            prefix = self._checksum.prefix() if self._checksum.size else None
            self._head = (self._checksum.size, prefix) if prefix is not None else (0, "")
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
            if self.before_publish is not None:
                self.before_publish()
            self._finish()
            self._result = WrittenObject(
                key=self.key,
                size=self._checksum.size,
                checksum=self._checksum.whole(),
                block_size=self._checksum.block_size,
                block_checksums=tuple(self._checksum.blocks()),
                head_size=self._head[0] if self._head else 0,
                head_checksum=self._head[1] if self._head else "",
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

    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        """Bytes ``[start, end)`` of `key` (`end` None: to the end): a `read_span` waited to its
        end.

        With a `record`, the size is checked and the covering blocks are read and verified; a
        mismatch raises CorruptObjectError. Raises FileNotFoundError when the object does not
        exist.
        """
        span = self.read_span(key, start, sys.maxsize if end is None else end, record)
        try:
            span.ready(span.last)
        except BaseException:
            span.cancel()
            raise
        stop = span.last if end is None else min(end, span.last)
        return span.data[start - span.first : max(start, stop) - span.first]

    @abstractmethod
    def read_span(self, key: str, start: int, end: int, record: ObjectRecord | None) -> SpanRead:
        """Start reading ``[start, end)`` of `key` (block-aligned outward with a `record`,
        clipped to the object's size); `SpanRead.ready` waits for and verifies a prefix.

        Raises FileNotFoundError when the object does not exist and CorruptObjectError on a
        size mismatch, here or from `ready`.
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

    def is_temporary(self, key: str) -> bool:
        """Whether a listed key is an object still being written (a temporary name that is
        renamed when its writer closes). Objects in flight are not listed on S3."""
        return False

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
    return _open_backend(root, storage_options, config or TransferConfig())


def _open_backend(
    root: str, storage_options: Mapping[str, Any] | None, config: TransferConfig
) -> Storage:
    from trainctl.checkpoint.storage_local import LocalStorage

    if root.startswith("s3://"):
        from trainctl.checkpoint.storage_s3 import S3Storage

        return S3Storage(root, config, dict(storage_options or {}))
    if root.startswith("file://"):
        return LocalStorage(root[len("file://") :], config)
    if "://" in root:
        raise ValueError(f"unsupported storage URL {root!r}: use a path, file:// or s3://")
    return LocalStorage(root, config)
