"""The memory tier's slot files and restore index: names, atomic records, JSON round trips."""

from __future__ import annotations

from pathlib import Path

from trainctl.checkpoint.slot_layout import (
    SLOT_SUM,
    Layout,
    RankCopy,
    RestoreIndex,
    SlotChecksums,
    SlotRecord,
    Source,
    checksums_name,
    layout_name,
    read_json,
    record_name,
    slot_name,
    write_json_atomic,
)


def test_names_sort_by_rank_and_slot() -> None:
    assert slot_name(3, 1) == "rank-00003.slot-1"
    assert record_name(3, 1) == "rank-00003.slot-1.json"
    assert checksums_name(3, 0) == "rank-00003.slot-0.crc.json"
    assert layout_name(12) == "rank-00012.layout.json"
    assert sorted([slot_name(10, 0), slot_name(9, 0)]) == [slot_name(9, 0), slot_name(10, 0)]


def test_records_are_replaced_atomically_and_bad_ones_read_as_none(tmp_path: Path) -> None:
    path = str(tmp_path / record_name(0, 0))
    write_json_atomic(path, {"step": 7, "attempt": 2, "layout": "abc"})
    assert SlotRecord.from_json(read_json(path)) == SlotRecord(7, 2, "abc")
    write_json_atomic(path, {"step": 8, "attempt": 2, "layout": "abc"})
    assert SlotRecord.from_json(read_json(path)) == SlotRecord(8, 2, "abc")
    assert [p.name for p in tmp_path.iterdir()] == [record_name(0, 0)]  # no temporary left
    (tmp_path / "bad.json").write_text("{not json")
    assert read_json(str(tmp_path / "bad.json")) is None
    assert read_json(str(tmp_path / "missing.json")) is None
    assert SlotRecord.from_json({"step": "x"}) is None
    sums = {"step": 1, "layout": "d", "algorithm": SLOT_SUM, "crcs": ["0a0b0c0d"]}
    assert SlotChecksums.from_json(sums) == SlotChecksums(1, "d", ("0a0b0c0d",))
    # An older release's CRC-32 sums (no algorithm named) are not this release's: summed again.
    assert SlotChecksums.from_json({"step": 1, "layout": "d", "crcs": ["0a0b0c0d"]}) is None
    assert SlotChecksums.from_json({**sums, "algorithm": "crc32"}) is None


def test_layout_digest_changes_with_the_layout_and_index_round_trips() -> None:
    entries = ({"offset": 0, "nbytes": 64, "fqn": "w"}, {"offset": 64, "nbytes": 8, "fqn": "b"})
    layout = Layout(rank=1, world_size=2, attempt=3, nbytes=72, entries=entries)
    assert Layout.from_json(layout.to_json()) == layout
    moved = Layout(1, 2, 3, 72, ({"offset": 8, "nbytes": 64, "fqn": "w"}, entries[1]))
    assert moved.digest != layout.digest
    index = RestoreIndex(
        step=40,
        tier="peer",
        ranks=(
            RankCopy(layout, Source(path="/dev/shm/x/rank-00001.slot-0"), ("1", "2")),
            RankCopy(
                layout,
                Source(endpoint="127.0.0.1:1", relative="held/n/s", kind="replica"),
                ("3", "4"),
            ),
        ),
        skipped=("node-1: gone",),
        seconds=0.5,
    )
    assert RestoreIndex.from_json(index.to_json()) == index
