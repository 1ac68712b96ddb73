"""Drawing the timeline's layout (`trainctl.report.timeline.layout`): a bare SVG, a
self-contained HTML page (the SVG plus the ledger's tables), or a PNG. Pure: no I/O.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from trainctl.report.ledger import CATEGORIES, Ledger
from trainctl.report.png import Canvas, parse_color
from trainctl.report.timeline import (
    BACKGROUND,
    COLORS,
    TEXT,
    Picture,
    format_duration,
    format_share,
)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def _title(text: str) -> str:
    return f"<title>{html.escape(text)}</title>" if text else ""


def to_svg(picture: Picture) -> str:
    """The picture as a standalone SVG document (tooltips as <title> elements)."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{picture.width}" '
        f'height="{picture.height}" viewBox="0 0 {picture.width} {picture.height}" '
        f'font-family="sans-serif" role="img" aria-label="{_attr(picture.title)}">',
        f'<rect x="0" y="0" width="{picture.width}" height="{picture.height}" '
        f'fill="{BACKGROUND}"/>',
    ]
    for r in picture.rects:
        parts.append(
            f'<rect x="{r.x0:.2f}" y="{r.y0:.2f}" width="{max(r.x1 - r.x0, 0):.2f}" '
            f'height="{max(r.y1 - r.y0, 0):.2f}" fill="{r.color}">{_title(r.title)}</rect>'
        )
    for line in picture.lines:
        parts.append(
            f'<line x1="{line.x:.2f}" y1="{line.y0:.2f}" x2="{line.x:.2f}" y2="{line.y1:.2f}" '
            f'stroke="{line.color}" stroke-width="{line.width}">{_title(line.title)}</line>'
        )
    for t in picture.texts:
        parts.append(
            f'<text x="{t.x:.2f}" y="{t.y:.2f}" font-size="{t.size}" text-anchor="{t.anchor}" '
            f'fill="{TEXT}">{html.escape(t.text)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def to_png(picture: Picture) -> bytes:
    """The picture as PNG bytes: rectangles and lines only (no text)."""
    canvas = Canvas(picture.width, picture.height, parse_color(BACKGROUND))
    for r in picture.rects:
        canvas.fill_rect(r.x0, r.y0, r.x1, r.y1, parse_color(r.color))
    for line in picture.lines:
        canvas.vline(line.x, line.y0, line.y1, parse_color(line.color), line.width)
    return canvas.encode()


_STYLE = """
body { font-family: sans-serif; color: #263238; margin: 24px; }
table { border-collapse: collapse; margin: 12px 0 20px; }
th, td { padding: 2px 12px 2px 0; text-align: left; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
svg { max-width: 100%; height: auto; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if index in numeric else f"<td>{cell}</td>"
            for index, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _opt(value: object) -> str:
    return "" if value is None else html.escape(str(value))


def _gpu_section(gpu: dict[str, Any] | None) -> list[str]:
    """GPU utilisation tables (`trainctl.report.gpu.gpu_timeline`), when any node sent any."""
    if not gpu or not gpu.get("nodes"):
        return []
    per_attempt = [
        (
            html.escape(number),
            html.escape(node),
            f"{usage['mean_util_pct']:.1f}%",
            f"{usage['min_util_pct']}%",
            str(usage["num_readings"]),
        )
        for number, nodes in gpu["attempts"].items()
        for node, usage in nodes.items()
    ]
    size = format_duration(gpu["bucket_s"])
    over_time = [
        (html.escape(node), " ".join("-" if v is None else f"{v:.0f}" for v in buckets))
        for node, buckets in gpu["nodes"].items()
    ]
    return [
        "<h2>GPU utilisation</h2>",
        _table(("attempt", "node", "mean", "lowest", "readings"), per_attempt, {0, 2, 3, 4}),
        _table(("node", f"mean % per {size} (-: no sample)"), over_time, set()),
    ]


def to_html(ledger: Ledger, picture: Picture, gpu: dict[str, Any] | None = None) -> str:
    """A self-contained page: the SVG timeline, the ledger's tables and, with `gpu`, the GPU
    utilisation tables (no scripts, no links)."""
    wall = ledger.wall_s
    totals = ledger.seconds
    categories = [
        (
            f'<span class="swatch" style="background:{COLORS[c]}"></span>{c.value}',
            f"{totals[c.value]:.1f}",
            format_share(totals[c.value], wall),
        )
        for c in CATEGORIES
    ]
    attempts = [
        (
            str(a.number),
            html.escape(", ".join(a.nodes)),
            _opt(a.world_size),
            f"T+{format_duration(a.started_at - ledger.start)}",
            _opt(a.restored_step) + (f" ({a.restore_tier})" if a.restore_tier else ""),
            _opt(a.last_step),
            html.escape(a.outcome),
            _opt(a.cause),
            html.escape(a.reason),
        )
        for a in ledger.attempts
    ]
    failures = [
        (
            f"T+{format_duration(f.time - ledger.start)}",
            str(f.attempt),
            _opt(f.node),
            _opt(f.cause),
            _opt(f.fault),
            html.escape(f.reason),
        )
        for f in ledger.failures
    ]
    sections = [
        f"<h1>{html.escape(picture.title)}</h1>",
        to_svg(picture),
        "<h2>Where the time went</h2>",
        _table(("category", "seconds", "share"), categories, {1, 2}),
        "<h2>Attempts</h2>",
        _table(
            (
                "attempt",
                "nodes",
                "world",
                "start",
                "restored",
                "last step",
                "outcome",
                "cause",
                "reason",
            ),
            attempts,
            {0, 2, 4, 5},
        ),
    ]
    if failures:
        sections += [
            "<h2>Failures</h2>",
            _table(("time", "attempt", "node", "cause", "fault", "reason"), failures, {1}),
        ]
    sections += _gpu_section(gpu)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>trainctl report {html.escape(ledger.job_id)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
