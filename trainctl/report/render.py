"""The self-contained HTML report: the timeline picture as inline SVG
(`trainctl.report.draw.timeline_svg`), then the ledger's tables. Pure: no I/O, no scripts, no
links, nothing fetched when the page opens.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from trainctl.report.draw import inline_svg
from trainctl.report.ledger import CATEGORIES, Ledger
from trainctl.report.timeline import COLORS, format_duration, format_share

_STYLE = """
body { font-family: sans-serif; color: #263238; margin: 24px; }
table { border-collapse: collapse; margin: 12px 0 20px; }
th, td { padding: 2px 12px 2px 0; text-align: left; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
figure { margin: 0; }
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


def _gpu_section(gpu: dict[str, Any] | None, picture: str | None) -> list[str]:
    """GPU utilisation (`trainctl.report.gpu.gpu_timeline`) as a `picture` (an SVG document)
    and tables, when any node sent any."""
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
        f'<figure class="gpu">{inline_svg(picture)}</figure>' if picture else "",
        _table(("attempt", "node", "mean", "lowest", "readings"), per_attempt, {0, 2, 3, 4}),
        _table(("node", f"mean % per {size} (-: no sample)"), over_time, set()),
    ]


def to_html(
    ledger: Ledger,
    svg: str,
    gpu: dict[str, Any] | None = None,
    gpu_picture: str | None = None,
) -> str:
    """A self-contained page: the timeline picture `svg` (an SVG document, titled itself), the
    ledger's tables and, with `gpu`, the GPU utilisation picture `gpu_picture` (an SVG
    document, when given) and tables. No scripts, no links."""
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
        f"<h1>trainctl report: {html.escape(ledger.job_id)}</h1>",
        f'<figure class="timeline">{inline_svg(svg)}</figure>',
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
    sections += _gpu_section(gpu, gpu_picture)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>trainctl report {html.escape(ledger.job_id)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
