"""Storage seam on file:// and a real S3 endpoint: multipart, ranged reads, checksums, cleanup."""

from __future__ import annotations

import base64
import os
import zlib
from typing import Any

import pytest

from trainctl.checkpoint.checksum import StreamingChecksum, checksum_of
from trainctl.checkpoint.storage import (
    MIB,
    CorruptObjectError,
    TransferConfig,
    open_storage,
)
from trainctl.checkpoint.storage_s3 import S3Storage

PART = 5 * MIB  # S3's smallest legal part: many parts from a small object


def _open(root_and_options: tuple[str, dict[str, Any]], **config: Any) -> Any:
    root, options = root_and_options
    return open_storage(
        root, storage_options=options, config=TransferConfig(part_size=PART, **config)
    )


def _write_in_pieces(storage: Any, key: str, data: bytes, piece: int = 777_777) -> Any:
    writer = storage.open_writer(key)
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    assert writer.tell() == len(data)
    return writer.close()


def test_multipart_write_then_ranged_reads_match(storage_root: Any) -> None:
    storage = _open(storage_root, concurrency=3)
    data = os.urandom(3 * PART + 12345)  # 4 parts, the last one short
    written = _write_in_pieces(storage, "step-000000001/__0_0.distcp", data)
    assert written.size == len(data)
    assert written.checksum == checksum_of(data)
    assert len(written.block_checksums) == 4
    assert storage.list_objects("step-000000001") == {"step-000000001/__0_0.distcp": len(data)}

    record = written.to_record("__0_0.distcp", rank=0)
    assert bytes(storage.read("step-000000001/__0_0.distcp", record=record)) == data
    # an unaligned range is served from verified, block-aligned reads
    start, end = PART - 10, 2 * PART + 99
    got = storage.read("step-000000001/__0_0.distcp", start, end, record=record)
    assert bytes(got) == data[start:end]
    storage.close()


def test_s3_upload_is_multipart_and_memory_is_bounded(s3: Any) -> None:
    storage = open_storage(
        s3.root("p"),
        storage_options=s3.storage_options,
        config=TransferConfig(part_size=PART, concurrency=2),
    )
    assert isinstance(storage, S3Storage)
    data = os.urandom(4 * PART + 1)
    _write_in_pieces(storage, "big", data, piece=3 * MIB)
    # the object's ETag says how many parts it was uploaded in ("<md5>-<parts>")
    head = s3.client().head_object(Bucket=s3.bucket, Key="p/big")
    assert head["ETag"].strip('"').endswith("-5")
    # the store keeps the composite of the part CRCs trainctl sent (no checksum of its own)
    head = s3.client().head_object(Bucket=s3.bucket, Key="p/big", ChecksumMode="ENABLED")
    part_crcs = b"".join(
        zlib.crc32(data[o : o + PART]).to_bytes(4, "big") for o in range(0, len(data), PART)
    )
    composite = base64.b64encode(zlib.crc32(part_crcs).to_bytes(4, "big")).decode()
    assert head["ChecksumCRC32"].split("-")[0] == composite  # S3 appends "-<parts>"
    assert storage.buffers.allocated_bytes <= 2 * PART
    # a second object reuses the same buffers: no growth
    _write_in_pieces(storage, "big2", data, piece=3 * MIB)
    assert storage.buffers.allocated_bytes <= 2 * PART
    storage.close()


def test_corruption_and_truncation_are_detected(storage_root: Any) -> None:
    storage = _open(storage_root)
    data = os.urandom(PART + 1000)
    record = _write_in_pieces(storage, "obj", data).to_record("obj", rank=0)
    corrupted = bytearray(data)
    corrupted[PART + 5] ^= 0xFF
    storage.put("obj", bytes(corrupted))
    with pytest.raises(CorruptObjectError, match="block 1"):
        storage.read("obj", record=record)
    # the untouched first block still verifies on its own (a resharded read of it succeeds)
    assert bytes(storage.read("obj", 0, 100, record=record)) == data[:100]
    storage.put("obj", data[:-1])
    with pytest.raises(CorruptObjectError, match="size"):
        storage.read("obj", record=record)
    storage.close()


def test_span_reads_verify_as_the_reader_advances(storage_root: Any) -> None:
    # What a restore does: start a span, consume its front while the rest is fetched.
    storage = _open(storage_root, concurrency=2)
    data = os.urandom(3 * PART + 4321)
    record = _write_in_pieces(storage, "obj", data).to_record("obj", rank=0)
    span = storage.read_span("obj", PART + 7, 3 * PART + 10, record)
    assert (span.first, span.last) == (PART, len(data))  # widened to whole blocks
    span.ready(2 * PART)
    assert bytes(span.data[:PART]) == data[PART : 2 * PART]
    span.ready(span.last)
    assert bytes(span.data) == data[PART:]

    corrupted = bytearray(data)
    corrupted[2 * PART + 3] ^= 0xFF  # block 2
    storage.put("obj", bytes(corrupted))
    span = storage.read_span("obj", 0, len(data), record)
    span.ready(2 * PART)  # the blocks before the damage are served
    assert bytes(span.data[: 2 * PART]) == data[: 2 * PART]
    with pytest.raises(CorruptObjectError, match="block 2"):
        span.ready(2 * PART + 1)
    span.cancel()

    # A size that differs from the record fails when the span is opened or when it is read
    # (S3 checks each ranged response's Content-Range: no HEAD first), never silently.
    storage.put("obj", data[:-1])
    with pytest.raises(CorruptObjectError, match="size"):
        storage.read_span("obj", 0, 10, record).ready(10)
    storage.put("obj", data[: PART // 2])  # shrank below the ranges asked for
    with pytest.raises(CorruptObjectError, match=r"size|past the end"):
        storage.read_span("obj", PART, 3 * PART, record).ready(3 * PART)
    with pytest.raises(FileNotFoundError):
        storage.read_span("missing", 0, 10, None)
    with pytest.raises(FileNotFoundError):
        storage.read_span("missing", 0, 10, record).ready(10)
    storage.close()


def test_the_head_is_read_and_verified_on_its_own(storage_root: Any) -> None:
    """What a rank that loads only another rank's small items does: the bytes written before
    the write that took the object past HEAD_BYTES are the head, read and verified alone
    instead of the whole first block."""
    storage = _open(storage_root)
    head, rest = os.urandom(30_000), os.urandom(2 * PART)
    writer = storage.open_writer("obj")
    for start in range(0, len(head), 1000):  # small items: many small writes
        writer.write(head[start : start + 1000])
    writer.write(rest)  # the first large tensor
    written = writer.close()
    assert (written.head_size, written.head_checksum) == (len(head), checksum_of(head))
    record = written.to_record("obj", rank=1)
    span = storage.read_span("obj", 100, 200, record)
    assert (span.first, span.last) == (0, len(head))
    span.ready(200)
    assert bytes(span.data[100:200]) == head[100:200]
    assert storage.read_span("obj", 100, len(head) + 1, record).last == PART  # whole blocks

    corrupted = bytearray(head + rest)
    corrupted[10] ^= 0xFF
    storage.put("obj", bytes(corrupted))
    with pytest.raises(CorruptObjectError, match="head"):
        storage.read("obj", 0, 100, record=record)
    # an object whose first write is already large has no head
    assert _write_in_pieces(storage, "big", rest, piece=len(rest)).head_size == 0
    storage.close()


def test_exclusive_put_never_overwrites(storage_root: Any) -> None:
    storage = _open(storage_root)
    storage.put("step-000000002/manifest.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.put("step-000000002/manifest.json", b"second", exclusive=True)
    assert bytes(storage.read("step-000000002/manifest.json")) == b"first"
    storage.close()


def test_listing_renaming_and_deleting(storage_root: Any) -> None:
    storage = _open(storage_root)
    for key in ["step-000000001/a", "step-000000001/b", "step-000000002/a", "other"]:
        storage.put(key, b"x" * 3)
    assert storage.list_dirs() == ["step-000000001", "step-000000002"]
    assert storage.size("step-000000001/a") == 3
    assert storage.size("missing") is None
    with pytest.raises(FileNotFoundError):
        storage.read("missing")
    storage.rename("step-000000001/a", "step-000000001/c")
    assert sorted(storage.list_objects("step-000000001")) == [
        "step-000000001/b",
        "step-000000001/c",
    ]
    assert storage.delete_prefix("step-000000001") == 2
    assert storage.list_dirs() == ["step-000000002"]
    storage.close()


def test_aborted_writer_publishes_nothing(storage_root: Any) -> None:
    storage = _open(storage_root)
    writer = storage.open_writer("half")
    writer.write(os.urandom(2 * PART + 1))  # two parts already sent on S3
    writer.abort()
    assert storage.list_objects() == {}
    assert storage.list_uploads() == []
    storage.close()


def test_orphaned_multipart_uploads_are_listed_and_aborted(s3: Any) -> None:
    client = s3.client()
    orphan = client.create_multipart_upload(Bucket=s3.bucket, Key="p/step-000000003/__1_0.distcp")
    client.upload_part(
        Bucket=s3.bucket,
        Key="p/step-000000003/__1_0.distcp",
        UploadId=orphan["UploadId"],
        PartNumber=1,
        Body=b"x" * PART,
    )
    storage = open_storage(s3.root("p"), config=TransferConfig(part_size=PART))  # AWS_* env
    uploads = storage.list_uploads()
    assert [(u.key, u.upload_id) for u in uploads] == [
        ("step-000000003/__1_0.distcp", orphan["UploadId"])
    ]
    storage.abort_upload(uploads[0])
    assert storage.list_uploads() == []
    storage.close()


def test_s3_outage_fails_cleanly_after_retries(tmp_path: Any) -> None:
    # Nothing listens on this port: every attempt is refused, the call must fail (not hang)
    # after max_attempts with backoff.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = open_storage(
        "s3://nowhere/p",
        storage_options={"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"},
        config=TransferConfig(part_size=PART, max_attempts=2, backoff_s=0.01),
    )
    with pytest.raises(Exception) as raised:
        storage.put("x", b"data")
    assert not isinstance(raised.value, AssertionError)
    storage.close()


def test_streaming_checksum_blocks_are_offset_aligned() -> None:
    data = os.urandom(1000)
    summer = StreamingChecksum(300)
    for piece in (data[:10], data[10:700], data[700:]):
        summer.update(piece)
    assert summer.whole() == checksum_of(data)
    assert summer.blocks() == [checksum_of(data[i : i + 300]) for i in range(0, 1000, 300)]


def _direct_io_supported(directory: Any) -> bool:
    """Whether this file system takes an aligned O_DIRECT write (tmpfs and some overlays
    refuse it: the writer must then fall back, not fail)."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(directory, "probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.write(fd, mmap.mmap(-1, 4096))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize("direct_io", [True, False])
def test_local_writes_whole_buffers_direct_and_the_tail_buffered(
    tmp_path: Any, direct_io: bool
) -> None:
    storage = open_storage(
        str(tmp_path / "store"),
        config=TransferConfig(part_size=64 * 1024, concurrency=2, direct_io=direct_io),
    )
    expect_direct = direct_io and _direct_io_supported(tmp_path)
    for size in (0, 1, 4095, 4096, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 + 4321):
        data = os.urandom(size)
        writer = storage.open_writer(f"obj-{size}")
        for start in range(0, size, 10_007):  # pieces that straddle every buffer boundary
            writer.write(data[start : start + 10_007])
        written = writer.close()
        assert written.size == size and written.checksum == checksum_of(data)
        assert os.path.getsize(tmp_path / "store" / f"obj-{size}") == size
        assert bytes(storage.read(f"obj-{size}", record=written.to_record("x", 0))) == data
        # whole 64 KiB buffers went direct where the file system allows it; never the tail
        assert writer.direct_bytes == ((size // (64 * 1024)) * 64 * 1024 if expect_direct else 0)
    assert not [name for name in os.listdir(tmp_path / "store") if ".tmp-" in name]
    storage.close()


def test_local_writers_beyond_the_buffer_pool_write_buffered(tmp_path: Any) -> None:
    # More writers open at once than aligned buffers: the extra ones write buffered instead of
    # waiting for a buffer that only another open writer could give back.
    storage = open_storage(
        str(tmp_path / "store"), config=TransferConfig(part_size=64 * 1024, concurrency=1)
    )
    data = [os.urandom(200_000 + i) for i in range(3)]
    writers = [storage.open_writer(f"obj-{i}") for i in range(3)]
    for writer, payload in zip(writers, data, strict=True):
        writer.write(payload[:100_000])
    for writer, payload in zip(writers, data, strict=True):
        writer.write(payload[100_000:])
    written = [writer.close() for writer in writers]
    for i, payload in enumerate(data):
        assert written[i].checksum == checksum_of(payload)
        assert bytes(storage.read(f"obj-{i}")) == payload
    assert storage.write_buffers.allocated_bytes == 64 * 1024
    storage.close()


def test_a_direct_writer_that_loses_the_pool_goes_on_buffered(tmp_path: Any) -> None:
    # Writer A has gone O_DIRECT; writer B then holds the only buffer, so A's next bytes must be
    # written buffered: with the descriptor switched back (unaligned O_DIRECT writes fail).
    import time

    chunk = 64 * 1024
    storage = open_storage(
        str(tmp_path / "store"), config=TransferConfig(part_size=chunk, concurrency=1)
    )
    first, second = os.urandom(chunk + 10_000), os.urandom(1000)
    a, b = storage.open_writer("a"), storage.open_writer("b")
    a.write(first[:chunk])  # one whole buffer, in flight on an I/O thread
    deadline = time.monotonic() + 10
    while (buffer := storage.write_buffers.try_acquire()) is None:  # until it came back
        assert time.monotonic() < deadline
        time.sleep(0.01)
    storage.write_buffers.release(buffer)
    b.write(second)  # B gathers in the pool's only buffer and keeps it
    a.write(first[chunk:])
    written_a, written_b = a.close(), b.close()
    assert written_a.checksum == checksum_of(first) and written_b.checksum == checksum_of(second)
    assert bytes(storage.read("a")) == first and bytes(storage.read("b")) == second
    storage.close()
