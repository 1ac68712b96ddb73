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
