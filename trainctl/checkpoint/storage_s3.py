"""The S3 backend of the checkpoint storage seam (s3fs's async client): concurrent multipart
uploads from a bounded, reused buffer pool, concurrent verified ranged reads, one retry policy."""

from __future__ import annotations

import asyncio
import errno
import functools
import mmap
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from trainctl.checkpoint.buffers import BufferPool
from trainctl.checkpoint.checksum import BytesLike, StreamingChecksum
from trainctl.checkpoint.layout import join
from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.checkpoint.s3_transfer import (
    S3Writer,
    content_range_size,
    is_retryable,
    read_body_into,
)
from trainctl.checkpoint.storage import (
    MIB,
    CorruptObjectError,
    ObjectWriter,
    PendingUpload,
    SpanRead,
    Storage,
    TransferConfig,
    WrittenObject,
)
from trainctl.storage_errors import translate

T = TypeVar("T")

S3_MIN_PART_SIZE = 5 * MIB
"""S3 rejects non-final multipart parts smaller than 5 MiB."""


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
        if config.give_up_s is not None:
            # botocore's max_attempts counts retries (1: two attempts); within the bound, one.
            config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            config_kwargs.setdefault("connect_timeout", config.give_up_s)
            config_kwargs.setdefault("read_timeout", config.give_up_s)
        config_kwargs.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        # skip_instance_cache: each Storage owns its client, so closing one never breaks another.
        self.fs = s3fs.S3FileSystem(
            skip_instance_cache=True, config_kwargs=config_kwargs, **options
        )
        self.fs.retries = 1
        self.buffers: BufferPool[bytearray] = BufferPool(
            config.part_size, config.concurrency, bytearray
        )
        self._read_limit: asyncio.Semaphore | None = None

    def bucket_key(self, key: str) -> tuple[str, str]:
        """The bucket and full object key of `key`."""
        return self._bucket, join(self._prefix, key)

    # -- request plumbing

    async def call_async(self, method: str, *, attempts: int | None = None, **kwargs: Any) -> Any:
        """One S3 request with retries and backoff on transient errors (on the I/O loop)."""
        attempts = attempts or self.config.max_attempts
        body_factory = kwargs.pop("body_factory", None)
        clock = asyncio.get_running_loop().time
        give_up = None if self.config.give_up_s is None else clock() + self.config.give_up_s
        for attempt in range(1, attempts + 1):
            try:
                if body_factory is not None:
                    kwargs["Body"] = body_factory()
                request = self.fs._call_s3(method, **kwargs)
                if give_up is None:
                    return await request
                # botocore's timeouts do not bound all of a request (a PUT to an endpoint that
                # accepts the connection and never answers took 96 s): the bound does.
                return await asyncio.wait_for(request, max(0.0, give_up - clock()))
            except Exception as error:
                delay = self.config.retry_delay(attempt)
                late = give_up is not None and clock() + delay > give_up
                if attempt == attempts or late or not is_retryable(error):
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def call(self, method: str, *, attempts: int | None = None, **kwargs: Any) -> Any:
        """`call_async` from a normal thread (blocks until the request finished).

        A failure a person must act on (no credentials, unreachable endpoint, missing or
        denied bucket) raises a `StorageError` naming the root and the fix."""
        try:
            return self.submit(
                lambda: self.call_async(method, attempts=attempts, **kwargs)
            ).result()
        except Exception as error:
            translated = translate(error, self.root, self.config.give_up_s)
            if translated is None or translated is error:
                raise
            raise translated from error

    def submit(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        """Schedule a coroutine on the I/O loop; returns a thread-safe future."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.fs.loop)

    # -- objects

    def open_writer(self, key: str) -> ObjectWriter:
        return S3Writer(self, key)

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
        if record is None and start == 0 and end is None:
            # A small whole object (manifest, DCP's .metadata): one GET, no HEAD first.
            bucket, s3_key = self.bucket_key(key)
            return memoryview(self.submit(lambda: self._get_whole(bucket, s3_key)).result())
        return super().read(key, start, end, record)

    def read_span(self, key: str, start: int, end: int, record: ObjectRecord | None) -> SpanRead:
        """Ranged GETs for ``[start, end)`` start now, in order, sharing the storage's
        `concurrency` with every other read; `SpanRead.ready` waits (and verifies) up to a
        point, so the front of the span can be used while the rest is in flight.

        With a `record` there is no HEAD first: the record has the size, and every ranged
        response's ``Content-Range`` reports the object's, checked against it (an object that
        shrank below a range fails with InvalidRange, reported the same way).
        """
        if record is not None:
            first, last = record.block_range(start, end)
        else:
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(self.url(key))
            first, last = start, min(end, size)
        length = max(0, last - first)
        # Anonymous mmap: uninitialised pages filled by the download itself (a bytearray is
        # zero-filled first: a second pass over every byte, ~20 ms per 50 MB here).
        view = memoryview(mmap.mmap(-1, length) if length else bytearray())
        chunk = record.block_size if record else self.config.part_size
        expected = record.size if record else None
        chunks: list[tuple[int, int, Future[None] | None]] = []
        for offset in range(first, last, chunk):
            stop = min(offset + chunk, last)
            fetch = self.submit(
                functools.partial(
                    self._fetch_range, key, offset, stop, view, first, expected_size=expected
                )
            )
            chunks.append((offset, stop, fetch))
        return SpanRead(key, first, view, chunks, record)

    async def _get_whole(self, bucket: str, s3_key: str) -> bytearray:
        async with self._reads():
            response = await self.call_async("get_object", Bucket=bucket, Key=s3_key)
            data = bytearray(int(response["ContentLength"]))
            got = await read_body_into(response["Body"], memoryview(data))
        if got != len(data):
            raise CorruptObjectError(s3_key, [f"GET returned {got} of {len(data)} bytes"])
        return data

    def _reads(self) -> asyncio.Semaphore:
        # Created on first use from the I/O loop (asyncio primitives bind to the running loop).
        if self._read_limit is None:
            self._read_limit = asyncio.Semaphore(self.config.concurrency)
        return self._read_limit

    async def _fetch_range(
        self,
        key: str,
        start: int,
        end: int,
        view: memoryview,
        base: int,
        *,
        expected_size: int | None,
    ) -> None:
        bucket, s3_key = self.bucket_key(key)
        async with self._reads():  # FIFO: ranges are served in the order they were asked for
            try:
                response = await self.call_async(
                    "get_object", Bucket=bucket, Key=s3_key, Range=f"bytes={start}-{end - 1}"
                )
            except OSError as error:
                if expected_size is None or error.errno != errno.EINVAL:
                    raise
                raise CorruptObjectError(
                    key, [f"range {start}..{end} is past the end (recorded size {expected_size})"]
                ) from error
            size = content_range_size(response.get("ContentRange"))
            if expected_size is not None and size is not None and size != expected_size:
                response["Body"].close()
                raise CorruptObjectError(key, [f"size {size} != recorded {expected_size}"])
            got = await read_body_into(response["Body"], view[start - base : end - base])
        if got != end - start:
            raise CorruptObjectError(key, [f"range {start}..{end} returned {got} bytes"])

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
