"""The timeline picture: what it shows (`build_timeline`, pure) and how it is drawn (matplotlib:
PNG decoded back, SVG parsed back), escaping included."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest

from tests.unit.test_goodput import ended, ev, job, node_failure_with_spare, started
from trainctl.report.draw import gpu_svg, inline_svg, timeline_png, timeline_svg
from trainctl.report.goodput import build_ledger
from trainctl.report.ledger import Category, Failure
from trainctl.report.render import to_html
from trainctl.report.timeline import (
    COLORS,
    MAX_NODE_LANES,
    RESOLUTION,
    MarkKind,
    Timeline,
    build_timeline,
    failure_label,
    format_clock,
    lane_name,
    tick_step,
)
from trainctl.state import JobState

SVG = "{http://www.w3.org/2000/svg}"


def spare_timeline() -> Timeline:
    return build_timeline(build_ledger(*node_failure_with_spare()))


def test_a_lane_per_attempt_and_node_after_the_job_lane() -> None:
    timeline = spare_timeline()
    assert [lane.name for lane in timeline.lanes] == [
        "job",
        "attempt 1 · n0",
        "attempt 1 · n1",
        "attempt 2 · n0",
        "attempt 2 · n2",
    ]
    job_lane = timeline.lanes[0]
    # the job lane has the time between attempts; an attempt's lanes only its own time
    assert {b.category for b in job_lane.bars} >= {Category.STARTUP, Category.RESTART}
    second = timeline.lanes[3]
    assert min(b.start_s for b in second.bars) >= 66  # attempt 2 started at T+66s
    assert Category.STARTUP not in {b.category for b in second.bars}


def test_marks_sit_on_their_lanes_with_labels_and_tooltips() -> None:
    timeline = spare_timeline()
    by_kind = {kind: [m for m in timeline.marks if m.kind is kind] for kind in MarkKind}
    (failure,) = by_kind[MarkKind.FAILURE]
    assert (failure.time_s, failure.lanes, failure.label) == (59.5, (2,), "n1: node_fault")
    assert failure.tooltip == (
        "attempt 1 failed on n1 (node_fault), injected kill-node at T+59.5s: n1: node agent lost"
    )
    (checkpoint,) = by_kind[MarkKind.CHECKPOINT]
    assert (checkpoint.time_s, checkpoint.lanes) == (52, (1, 2))
    assert checkpoint.tooltip.startswith("checkpoint step 40 committed (durable) at T+52s")
    (restore,) = by_kind[MarkKind.RESTORE]
    assert (restore.time_s, restore.lanes) == (70, (3, 4))
    assert "restore step 40 took 2s" in restore.tooltip
    (exclusion,) = by_kind[MarkKind.EXCLUSION]
    assert (exclusion.time_s, exclusion.lanes) == (65, (2,))
    assert exclusion.tooltip == "n1 excluded at T+1m05s: node agent lost"


def test_title_and_wall_clock() -> None:
    timeline = spare_timeline()
    assert timeline.title == "j1 (succeeded): goodput 74.2% of 2m12s"
    assert timeline.subtitle == "1970-01-01 00:00:00 UTC to 1970-01-01 00:02:12 UTC"
    assert timeline.legend[0] == (Category.PRODUCTIVE, "productive 1m38s (74.2%)")


def test_a_live_job_says_it_has_not_ended() -> None:
    events = [ev(0, "job_created"), started(1, 0, ["a"], 1), ev(3, "first_step", 0, step=1)]
    timeline = build_timeline(build_ledger(job(JobState.RUNNING), events, now=50.0))
    assert timeline.title == "j1 (running): goodput 0.0% of 50s"
    assert timeline.subtitle.endswith("00:00:50 UTC (not ended yet)")
    assert [lane.name for lane in timeline.lanes] == ["job", "attempt 0 · a"]


def test_a_job_without_attempts_or_time_still_draws() -> None:
    ledger = build_ledger(job(JobState.PENDING), [], now=0.0)
    timeline = build_timeline(ledger)
    assert [lane.name for lane in timeline.lanes] == ["job"] and timeline.wall_s == 0
    assert timeline_png(timeline).startswith(b"\x89PNG")
    ET.fromstring(timeline_svg(timeline))


@pytest.mark.parametrize(
    ("failure", "label"),
    [
        (Failure(1, 1, "node-1", "node_fault", "", "failed", "kill-node"), "node-1: node_fault"),
        (Failure(1, 1, None, "software_error", "", "failed", None), "software_error"),
        (Failure(1, 1, "node-3", None, "", "controller_lost", None), "node-3: controller_lost"),
    ],
)
def test_failure_label(failure: Failure, label: str) -> None:
    assert failure_label(failure) == label


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((2, "node-1"), "attempt 2 · node-1"),
        ((2, None, 62), "attempt 2 · 62 other nodes"),
        ((2, None, 1), "attempt 2 · 1 other node"),
        ((3, None), "attempt 3"),
    ],
)
def test_lane_name(args: tuple, name: str) -> None:  # type: ignore[type-arg]
    assert lane_name(*args) == name


@pytest.mark.parametrize(("wall", "step"), [(0.5, 0.1), (132, 15), (3600, 600), (86400, 10800)])
def test_tick_step(wall: float, step: float) -> None:
    assert tick_step(wall) == step


def test_format_clock_is_utc() -> None:
    assert format_clock(1_796_389_509) == "2026-12-04 13:05:09 UTC"


def test_a_big_attempt_names_only_its_marked_nodes() -> None:
    nodes = [f"n{i}" for i in range(20)]
    events = [
        ev(0, "job_created"),
        started(0, 1, nodes, 20),
        ev(1, "first_step", 1, step=1),
        ended(9, 1, "failed", cause="node_fault", blamed="n7", reason="n7: gone", decided_at=9),
        ev(9.5, "job_failed"),
    ]
    timeline = build_timeline(build_ledger(job(), events, now=1e9))
    assert len(nodes) > MAX_NODE_LANES
    assert [lane.name for lane in timeline.lanes] == [
        "job",
        "attempt 1 · n7",
        "attempt 1 · 19 other nodes",
    ]
    (failure,) = timeline.marks
    assert (failure.lanes, failure.label) == ((1,), "n7: node_fault")


def test_a_failure_without_a_node_marks_every_lane_of_its_attempt() -> None:
    events = [
        ev(0, "job_created"),
        started(0, 1, ["n0", "n1"], 2),
        ended(5, 1, "failed", cause="software_error", reason="ValueError", decided_at=5),
        ev(6, "job_failed"),
    ]
    (failure,) = build_timeline(build_ledger(job(), events, now=1e9)).marks
    assert (failure.lanes, failure.label) == ((1, 2), "software_error")


def test_slivers_are_grouped_and_checkpoints_thinned() -> None:
    """A day of 2 s steps with a 0.1 s stall each: too thin to draw one by one."""
    events = [ev(0, "job_created"), started(0, 1, ["n0"], 2), ev(1, "first_step", 1, step=1)]
    events += [
        ev(2 + 2 * k, "checkpoint_committed", 1, step=k, stall_s=0.1, durable_s=0.5)
        for k in range(20_000)
    ]
    events += [
        ended(40_005, 1, "succeeded", last_step=20_000, last_step_at=40_004, decided_at=40_005),
        ev(40_006, "job_succeeded"),
    ]
    ledger = build_ledger(job(), events, now=1e9)
    assert ledger.seconds["checkpoint_stall"] > 1000
    timeline = build_timeline(ledger)
    job_lane = timeline.lanes[0]
    assert len(job_lane.bars) < 10
    widest = max(job_lane.bars, key=lambda b: b.end_s - b.start_s)
    assert widest.category is Category.PRODUCTIVE
    assert len(timeline.marks) <= RESOLUTION + 1
    assert len(timeline_svg(timeline)) < 1_000_000


def test_png_is_a_picture_of_the_timeline() -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(timeline_png(spare_timeline()))).convert("RGB")
    assert image.width == 1200 and image.height > 300
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 24) or []}
    for category in (Category.PRODUCTIVE, Category.RESTORE, Category.FAILURE_DETECTION):
        value = COLORS[category].lstrip("#")
        assert tuple(int(value[i : i + 2], 16) for i in (0, 2, 4)) in colours, category
    assert len(colours) > 50, "text is drawn (anti-aliased glyphs)"


def test_svg_keeps_its_words_and_tooltips() -> None:
    svg = timeline_svg(spare_timeline())
    root = ET.fromstring(svg)
    words = " ".join(" ".join(t.itertext()) for t in root.iter(f"{SVG}text"))
    for expected in (
        "j1 (succeeded): goodput 74.2% of 2m12s",
        "attempt 1 · n1",
        "attempt 2 · n2",
        "n1: node_fault",
        "productive 1m38s (74.2%)",
        "checkpoint committed (durable)",
        "checkpoint restored",
        "node excluded",
        "failure (node: cause)",
        "T+1m00s",
        "time since job start",
    ):
        assert expected in words, expected
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert any(t.startswith("attempt 1 failed on n1") for t in titles)
    assert any(t.startswith("checkpoint step 40") for t in titles)
    assert any(t.startswith("productive") for t in titles)
    assert svg == timeline_svg(spare_timeline()), "the same ledger draws the same SVG"


def test_two_pictures_in_one_page_do_not_share_ids() -> None:
    ids = [
        set(re.findall(r'id="([^"]+)"', timeline_svg(spare_timeline(), prefix)))
        for prefix in ("a", "b")
    ]
    assert ids[0] and not ids[0] & ids[1]


def test_text_from_the_store_is_escaped() -> None:
    hostile = '<script>alert("x")</script> & </svg>'
    events = [
        ev(0, "job_created"),
        started(0, 1, [hostile], 2),
        ended(5, 1, "failed", reason=hostile, cause="worker_crash", blamed=hostile, decided_at=5),
        ev(6, "job_failed"),
    ]
    ledger = build_ledger(job(), events, now=1e9)
    timeline = build_timeline(ledger)
    page = to_html(ledger, timeline_svg(timeline))
    assert "<script" not in page and "&lt;script&gt;" in page
    svg = re.search(r"<svg.*?</svg>", page, flags=re.S)
    assert svg is not None
    words = " ".join(ET.fromstring(svg.group(0)).itertext())
    assert f"attempt 1 · {hostile}" in words and f"{hostile}: worker_crash" in words
    assert inline_svg(timeline_svg(timeline)).startswith("<svg")


def test_gpu_heat_map_sits_in_the_page_beside_the_timeline() -> None:
    ledger = build_ledger(*node_failure_with_spare())
    gpu = {
        "start": ledger.start,
        "bucket_s": 30.0,
        "nodes": {"n0": [90, 95, None, 80, 99], "n1": [10, None, None, None, None]},
        "attempts": {"1": {"n0": {"mean_util_pct": 90.0, "min_util_pct": 80, "num_readings": 3}}},
    }
    assert gpu_svg({**gpu, "nodes": {}}, ledger.wall_s) is None
    heat_map = gpu_svg(gpu, ledger.wall_s)
    assert heat_map is not None
    words = " ".join(ET.fromstring(heat_map).itertext())
    assert "GPU utilisation per node, mean % per 30s" in words and "n1" in words
    page = to_html(ledger, timeline_svg(build_timeline(ledger)), gpu, heat_map)
    assert page.index('<figure class="timeline">') < page.index('<figure class="gpu">')
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "two inline pictures, no id shared"
