"""Tables for the pure parts: step names, retention decisions, manifests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainctl.checkpoint import layout
from trainctl.checkpoint.checksum import checksum_of
from trainctl.checkpoint.manifest import (
    Manifest,
    ManifestError,
    ObjectRecord,
    check_listing,
    validate_objects,
)
from trainctl.checkpoint.retention import (
    RetentionPolicy,
    decide_retention,
    upload_is_orphaned,
)


@pytest.mark.parametrize(
    ("step", "name"),
    [(0, "step-000000000"), (7, "step-000000007"), (123456789, "step-123456789")],
)
def test_step_names_round_trip(step: int, name: str) -> None:
    assert layout.step_dir_name(step) == name
    assert layout.parse_step_dir(name) == step
    assert layout.parse_step_dir(f"s3://bucket/ckpt/job/{name}/") == step


@pytest.mark.parametrize(
    "name", ["step-1", "step-00000001", "step-abcdefghi", "steps-000000001", "manifest.json", ""]
)
def test_non_step_names_are_ignored(name: str) -> None:
    assert layout.parse_step_dir(name) is None


def test_big_steps_parse_and_negative_steps_are_refused() -> None:
    assert layout.parse_step_dir(layout.step_dir_name(12_345_678_901)) == 12_345_678_901
    with pytest.raises(ValueError):
        layout.step_dir_name(-1)


@pytest.mark.parametrize(
    ("parts", "joined"),
    [
        (("s3://b/p/", "", "step-000000001"), "s3://b/p/step-000000001"),
        (("/tmp/x", "a/", "/b"), "/tmp/x/a/b"),
        (("/", "a"), "/a"),
        (("rel", "x"), "rel/x"),
    ],
)
def test_join_keeps_url_schemes(parts: tuple[str, ...], joined: str) -> None:
    assert layout.join(*parts) == joined


def test_job_checkpoint_root() -> None:
    assert layout.job_checkpoint_root("s3://b/tc", "job-1") == "s3://b/tc/checkpoints/job-1"


def test_pure_modules_import_nothing_side_effecting() -> None:
    banned = {"os", "subprocess", "socket", "fsspec", "s3fs", "time", "torch", "shutil"}
    package = Path(layout.__file__).parent
    for module in ("layout.py", "retention.py", "manifest.py", "checksum.py"):
        tree = ast.parse((package / module).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & banned, (module, imported & banned)


# ------------------------------------------------------------------------------- retention

RETENTION_TABLE = [
    # committed, uncommitted, keep_last, keep_every, protected, deleted steps
    ([10, 20, 30, 40], [], 2, None, [], [10, 20]),
    ([10, 20, 30, 40], [], 3, None, [], [10]),
    ([10, 20, 30, 40], [], 2, 20, [], [10]),
    ([10, 20, 30, 40], [], 2, None, [10], [20]),
    ([10], [], 2, None, [], []),
    ([10, 20], [], 2, None, [], []),
    ([10, 20, 30], [25, 35], 2, None, [], [10, 25]),  # 35 may be the save in flight
    ([], [5, 7], 2, None, [], []),  # nothing committed yet: everything may be in progress
    ([10, 20, 30], [15], 2, None, [15], [10]),
    ([100, 200, 300, 400, 500], [], 2, 200, [], [100, 300]),
]


@pytest.mark.parametrize(
    ("committed", "uncommitted", "keep_last", "keep_every", "protected", "deleted"),
    RETENTION_TABLE,
)
def test_retention_table(
    committed: list[int],
    uncommitted: list[int],
    keep_last: int,
    keep_every: int | None,
    protected: list[int],
    deleted: list[int],
) -> None:
    decisions = decide_retention(
        committed, uncommitted, RetentionPolicy(keep_last, keep_every), protected
    )
    assert sorted(d.step for d in decisions if d.delete) == deleted
    assert all(d.reason for d in decisions)
    kept_committed = [d.step for d in decisions if d.committed and not d.delete]
    if committed:
        assert max(committed) in kept_committed
        assert len(kept_committed) >= min(2, len(committed))


def test_retention_reasons_read_as_sentences() -> None:
    decisions = {
        d.step: d.reason
        for d in decide_retention([10, 20, 30], [5, 40], RetentionPolicy(keep_last=2))
    }
    assert decisions[30] == "newest committed step"
    assert decisions[20] == "among the newest 2 committed"
    assert decisions[10] == "older than the newest 2 committed steps"
    assert decisions[5].startswith("uncommitted leftover of a failed save")
    assert decisions[40].endswith("may be in progress")


@pytest.mark.parametrize("keep_last", [0, 1, -3])
def test_keep_last_below_two_is_refused(keep_last: int) -> None:
    with pytest.raises(ValueError, match="keep_last must be >= 2"):
        RetentionPolicy(keep_last=keep_last)


@pytest.mark.parametrize(
    ("step", "newest", "orphaned"),
    [(10, 20, True), (20, 20, True), (30, 20, False), (None, 20, False), (10, None, False)],
)
def test_upload_orphan_rule(step: int | None, newest: int | None, orphaned: bool) -> None:
    assert upload_is_orphaned(step, newest) is orphaned


# -------------------------------------------------------------------------------- manifest


def _record(path: str, data: bytes, block_size: int = 4) -> ObjectRecord:
    blocks = tuple(checksum_of(data[i : i + block_size]) for i in range(0, len(data), block_size))
    return ObjectRecord(path, len(data), checksum_of(data), block_size, blocks, rank=1)


def _manifest(*records: ObjectRecord) -> Manifest:
    return Manifest(
        step=42,
        world_size=2,
        created_at="2026-11-24T06:30:00+00:00",
        objects=records,
        timings={"upload_s": 1.5},
        trainctl_version="0.1.0",
        extra={"note": "x"},
    )


def test_manifest_json_round_trip() -> None:
    manifest = _manifest(_record(".metadata", b"meta"), _record("__1_0.distcp", b"0123456789"))
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.size_bytes == 14
    assert again.record("__1_0.distcp") == manifest.objects[1]


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"format": "other/1"}', '{"format": "trainctl-checkpoint/1"}'],
)
def test_malformed_manifests_are_refused(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_listing_check_finds_missing_and_truncated() -> None:
    manifest = _manifest(_record("a", b"12345678"), _record("b", b"1234"), _record("c", b"12"))
    problems = check_listing(manifest, {"a": 8, "b": 3, "stray": 9})
    assert [(p.path, p.problem) for p in problems] == [
        ("b", "size 3 differs from the recorded 4"),
        ("c", "missing"),
    ]


def test_block_verification() -> None:
    data = b"0123456789"
    record = _record("x", data)
    assert record.block_range(5, 7) == (4, 8)
    assert record.block_range(9, 10) == (8, 10)
    assert record.verify_range(4, data[4:8]) == []
    assert record.verify_range(0, data) == []
    bad = record.verify_range(4, b"4X67")
    assert len(bad) == 1 and "block 1" in bad[0]
    assert "not aligned" in record.verify_range(3, data[3:8])[0]


def test_a_head_is_read_and_verified_on_its_own() -> None:
    """A range within an object's head is served by the head alone, checked against its own
    checksum; a range past it reads whole blocks; manifests without heads still parse."""
    import dataclasses
    import json

    data = b"abcdefghij" + b"0123456789" * 3
    plain = _record("x", data, block_size=16)
    record = dataclasses.replace(plain, head_size=10, head_checksum=checksum_of(data[:10]))
    assert record.block_range(2, 9) == (0, 10)
    assert record.block_range(2, 11) == (0, 16)
    assert record.verify_range(0, data[:10]) == []
    bad = record.verify_range(0, b"abcdeXghij")
    assert len(bad) == 1 and "head" in bad[0]
    assert record.verify_range(0, data[:16]) == []  # whole blocks still verify as blocks

    manifest = _manifest(record)
    assert Manifest.from_json(manifest.to_json()) == manifest
    older = json.loads(_manifest(plain).to_json())
    for item in older["objects"]:
        del item["head_size"], item["head_checksum"]
    assert Manifest.from_json(json.dumps(older)).objects == (plain,)


def test_commit_validation() -> None:
    assert validate_objects(1, 2, [_record(".metadata", b"m"), _record("__0_0.distcp", b"d")]) == []
    assert "metadata" in validate_objects(1, 2, [_record("__0_0.distcp", b"d")])[0]
    dup = validate_objects(1, 2, [_record(".metadata", b"m"), _record(".metadata", b"m")])
    assert "written twice" in dup[0]


def test_streaming_checksum_combines_whole_crc_from_blocks() -> None:
    import os
    import random

    from trainctl.checkpoint.checksum import StreamingChecksum, checksum_of

    rng = random.Random(3)
    for block_size in (1, 7, 300):
        for size in (0, 1, 299, 300, 301, 2000):
            data = os.urandom(size)
            summer = StreamingChecksum(block_size)
            position = 0
            while position < size:
                step = rng.randint(1, 500)
                summer.update(data[position : position + step])
                position += step
            assert summer.whole() == checksum_of(data)
            assert summer.blocks() == [
                checksum_of(data[i : i + block_size]) for i in range(0, size, block_size)
            ]
            for index, expected in enumerate(summer.blocks()):
                assert f"crc32:{summer.block_crc(index):08x}" == expected
