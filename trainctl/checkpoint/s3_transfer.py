"""Moving bytes to and from S3: the multipart writer (parts from the storage's bounded buffer
pool, CRC-32 per part in flight), streamed part bodies and ranged-read bodies, and which errors
are worth a retry. Used by `S3Storage`."""

from __future__ import annotations

import asyncio
import base64
import errno
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from trainctl.checkpoint.storage import (
    MIB,
    ObjectWriter,
)
from trainctl.errors import StorageError

S3_MAX_PARTS = 10_000


if TYPE_CHECKING:
    from trainctl.checkpoint.storage_s3 import S3Storage


def is_retryable(error: BaseException) -> bool:
    if isinstance(
        error,
        FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError | ValueError,
    ):
        return False
    if isinstance(error, OSError) and error.errno == errno.EINVAL:
        return False  # s3fs's InvalidRange / InvalidRequest: the same request fails again
    if isinstance(error, OSError | asyncio.TimeoutError | TimeoutError):
        return True
    # botocore errors that s3fs did not translate (connection, read timeouts, 5xx)
    module = type(error).__module__
    return module.startswith(("botocore", "aiobotocore", "aiohttp"))


class S3Writer(ObjectWriter):
    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__(key, storage.config.part_size)
        self._storage = storage
        self._bucket, self._s3_key = storage.bucket_key(key)
        self._buffer: bytearray | None = None
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._part_crcs: list[str] = []

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
            # Declaring CRC-32 makes the object's checksum the composite of the part CRCs that
            # are sent anyway (without it S3 and S3-compatible stores compute a full-object
            # checksum of their own over every byte again when the upload completes).
            response = self._storage.call(
                "create_multipart_upload",
                Bucket=self._bucket,
                Key=self._s3_key,
                ChecksumAlgorithm="CRC32",
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
        crc = base64.b64encode(self._checksum.block_crc(number - 1).to_bytes(4, "big")).decode()
        self._part_crcs.append(crc)
        body_view = memoryview(buffer)[:filled]
        storage = self._storage

        async def upload() -> Any:
            return await storage.call_async(
                "upload_part",
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                PartNumber=number,
                ChecksumCRC32=crc,
                # A fresh body per attempt: streamed from the pooled buffer in slices.
                body_factory=lambda: part_body(body_view),
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
                etags.append(
                    {
                        "PartNumber": number,
                        "ETag": response["ETag"],
                        "ChecksumCRC32": self._part_crcs[number - 1],
                    }
                )
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


STREAM_SLICE = 1 * MIB
"""Bytes handed to the HTTP connection (upload) or taken from it (download) per step."""


def content_range_size(header: str | None) -> int | None:
    """The object size from ``Content-Range: bytes 0-99/1234`` (None if absent or ``*``)."""
    total = (header or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


async def read_body_into(body: Any, target: memoryview) -> int:
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


def part_body(view: memoryview) -> Any:
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
