"""The timeline picture (pure): the PNG rasteriser, the layout, escaping."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
import zlib

from tests.unit.test_goodput import ended, ev, job, node_failure_with_spare, started
from trainctl.report.goodput import build_ledger
from trainctl.report.ledger import Category
from trainctl.report.png import PNG_SIGNATURE, Canvas, parse_color
from trainctl.report.render import to_html, to_png, to_svg
from trainctl.report.timeline import COLORS, LANE, layout

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_rectangles_sharing_an_edge_tile_without_gaps() -> None:
    canvas = Canvas(10, 2)
    canvas.fill_rect(0, 0, 3.4, 2, RED)
    canvas.fill_rect(3.4, 0, 10, 2, BLUE)
    assert [canvas.pixel(x, 0) for x in range(10)] == [RED] * 3 + [BLUE] * 7


def test_drawing_is_clipped_to_the_canvas() -> None:
    canvas = Canvas(4, 4)
    canvas.fill_rect(-10, -10, 100, 1, RED)
    canvas.vline(3, 2, 99, BLUE)
    assert canvas.pixel(0, 0) == RED and canvas.pixel(3, 0) == RED
    assert canvas.pixel(3, 3) == BLUE and canvas.pixel(2, 3) == (255, 255, 255)


def test_encode_is_a_png_of_the_canvas() -> None:
    canvas = Canvas(3, 2, background=(1, 2, 3))
    data = canvas.encode()
    assert data.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", data[16:24]) == (3, 2)
    start = data.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", data[start - 8 : start - 4])
    assert zlib.decompress(data[start : start + length]) == (b"\x00" + b"\x01\x02\x03" * 3) * 2


def test_layout_has_a_lane_per_attempt_and_failure_tooltips() -> None:
    ledger = build_ledger(*node_failure_with_spare())
    picture = layout(ledger)
    lanes = [r for r in picture.rects if r.color == LANE]
    assert len(lanes) == 1 + len(ledger.attempts)
    tips = [line.title for line in picture.lines if "n1: node agent lost" in line.title]
    assert tips == ["attempt 1 failed on n1 (node_fault) at T+59.5s: n1: node agent lost"]
    png = to_png(picture)
    assert struct.unpack(">II", png[16:24]) == (picture.width, picture.height)


def test_slivers_are_grouped_and_coloured_by_what_dominates() -> None:
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
    picture = layout(ledger)
    job_lane = [r for r in picture.rects if r.y0 == picture.rects[0].y0 and r.color != LANE]
    assert len(job_lane) < 10
    assert max(job_lane, key=lambda r: r.x1 - r.x0).color == COLORS[Category.PRODUCTIVE]
    assert len(to_svg(picture)) < 100_000


def test_text_from_the_store_is_escaped() -> None:
    hostile = '<script>alert("x")</script> & </svg>'
    events = [
        ev(0, "job_created"),
        started(0, 1, [hostile], 2),
        ended(5, 1, "failed", reason=hostile, cause="worker_crash", decided_at=5),
        ev(6, "job_failed"),
    ]
    ledger = build_ledger(job(), events, now=1e9)
    page = to_html(ledger, layout(ledger))
    assert "<script" not in page and "&lt;script&gt;" in page
    svg = re.search(r"<svg.*?</svg>", page, flags=re.S)
    assert svg is not None
    ET.fromstring(svg.group(0))


def test_parse_color() -> None:
    assert parse_color("#43a047") == (0x43, 0xA0, 0x47)
