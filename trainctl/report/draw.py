"""Drawing a `trainctl.report.timeline.Timeline` with matplotlib (Agg): PNG bytes or SVG text.

matplotlib is imported inside `_figure` only, so `import trainctl` and every other command stay
fast. The SVG keeps its text as text (``svg.fonttype: none``: a browser finds and a reader can
copy the lane names) and every bar and mark carries a ``<title>`` tooltip; its ids are salted
per picture so that two pictures can sit inline in one HTML page. No I/O beyond the bytes
returned; output is deterministic (no date in the metadata, fixed hash salt).
"""

from __future__ import annotations

import html
import io
import re
from typing import TYPE_CHECKING, Any

from trainctl.report.timeline import (
    COLORS,
    MarkKind,
    Timeline,
    format_clock,
    format_duration,
    tick_step,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LANE = "#eef1f4"
"""Lane background: time not covered by the lane's attempt shows as this pale gap."""
TEXT = "#263238"
FAILURE = "#b71c1c"
CHECKPOINT = "#263238"
RESTORE = "#4a148c"
EXCLUSION = "#000000"

WIDTH_IN, DPI = 12.0, 100
LANE_IN = 0.4
"""Height of one lane, in inches."""
BAR_HEIGHT = 0.6
"""A bar's height as a share of its lane."""

_MARK_STYLE: dict[MarkKind, dict[str, Any]] = {
    MarkKind.FAILURE: {"marker": "v", "color": FAILURE, "markersize": 9},
    MarkKind.CHECKPOINT: {"marker": "|", "color": CHECKPOINT, "markersize": 9, "mew": 1.5},
    MarkKind.RESTORE: {"marker": "D", "color": RESTORE, "markersize": 6, "mec": "white"},
    MarkKind.EXCLUSION: {"marker": "X", "color": EXCLUSION, "markersize": 9, "mec": "white"},
}


class _Tips:
    """Tooltips by artist id (``gid``), added to the SVG as <title> elements after saving."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.text: dict[str, str] = {}

    def gid(self, tooltip: str) -> str:
        key = f"{self.prefix}-tip-{len(self.text)}"
        self.text[key] = tooltip
        return key

    def add_to(self, svg: str) -> str:
        def title(match: re.Match[str]) -> str:
            tip = self.text.get(match.group(1))
            return match.group(0) + (f"\n  <title>{html.escape(tip)}</title>" if tip else "")

        return re.sub(r'<g id="([^"]+)">', title, svg)


def _prefix_ids(svg: str, prefix: str) -> str:
    """Every id of `svg` (and every reference to one) starting with `prefix`: matplotlib
    numbers its groups ``axes_1``, ``patch_2``... in every figure alike."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))

    def rename(name: str) -> str:
        return name if name.startswith(f"{prefix}-") or name not in ids else f"{prefix}-{name}"

    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{rename(m.group(1))}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{rename(m.group(1))})", svg)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{rename(m.group(1))}"', svg)


def _bars(ax: Axes, timeline: Timeline, tips: _Tips) -> None:
    for row, lane in enumerate(timeline.lanes):
        ax.barh(row, timeline.wall_s, left=0, height=BAR_HEIGHT, color=LANE, zorder=1)
        if not lane.bars:
            continue
        drawn = ax.barh(
            [row] * len(lane.bars),
            [bar.end_s - bar.start_s for bar in lane.bars],
            left=[bar.start_s for bar in lane.bars],
            height=BAR_HEIGHT,
            color=[COLORS[bar.category] for bar in lane.bars],
            linewidth=0,
            zorder=2,
        )
        for patch, bar in zip(drawn.patches, lane.bars, strict=True):
            patch.set_gid(tips.gid(bar.tooltip))


def _marks(ax: Axes, timeline: Timeline, tips: _Tips) -> None:
    """Failures as a red line down their lanes (dotted across the others) with their label;
    checkpoints and restores at the foot of their lanes; exclusions in the middle."""
    below = BAR_HEIGHT / 2
    labelled: list[float] = []
    for mark in timeline.marks:
        style = _MARK_STYLE[mark.kind]
        rows = list(mark.lanes)
        if mark.kind is MarkKind.FAILURE:
            top, bottom = min(rows) - below, max(rows) + below
            ax.axvline(mark.time_s, color=FAILURE, linewidth=0.8, linestyle=":", zorder=3)
            ax.vlines(mark.time_s, top, bottom, color=FAILURE, linewidth=2, zorder=4)
            (point,) = ax.plot([mark.time_s], [top], linestyle="none", zorder=5, **style)
            # failures close together get their labels one above the other
            near = sum(1 for t in labelled if abs(t - mark.time_s) < timeline.wall_s / 8)
            labelled.append(mark.time_s)
            # labels near the right edge go to the left of their mark, inside the picture
            left = mark.time_s > 0.7 * timeline.wall_s
            ax.annotate(
                mark.label,
                (mark.time_s, top),
                xytext=(-4 if left else 4, 4 + 12 * near),
                textcoords="offset points",
                horizontalalignment="right" if left else "left",
                fontsize=9,
                color=FAILURE,
                fontweight="bold",
                zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        else:
            y = [r if mark.kind is MarkKind.EXCLUSION else r + below for r in rows]
            (point,) = ax.plot([mark.time_s] * len(y), y, linestyle="none", zorder=5, **style)
        point.set_gid(tips.gid(mark.tooltip))


def _legend(fig: Figure, timeline: Timeline) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=COLORS[c], label=text) for c, text in timeline.legend]
    handles += [
        Line2D([], [], linestyle="none", label=kind.value, **_MARK_STYLE[kind]) for kind in MarkKind
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=9, frameon=False)


def _figure(timeline: Timeline) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    num_lanes = len(timeline.lanes)
    fig = Figure(figsize=(WIDTH_IN, 2.6 + LANE_IN * num_lanes), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    fig.suptitle(timeline.title, fontsize=13, fontweight="bold", color=TEXT)
    ax.set_title(timeline.subtitle, fontsize=9, color=TEXT, loc="left")
    ax.set_yticks(range(num_lanes), [lane.name for lane in timeline.lanes], fontsize=9)
    ax.set_ylim(num_lanes - 0.5, -0.8)  # first lane on top, room for failure labels
    wall = timeline.wall_s if timeline.wall_s > 0 else 1.0
    ax.set_xlim(0, wall)
    ax.xaxis.set_major_locator(MultipleLocator(tick_step(wall)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"T+{format_duration(value)}"))
    ax.tick_params(axis="x", labelsize=9)
    start = format_clock(timeline.start)
    ax.set_xlabel(f"time since job start (T+0 = {start})", fontsize=9, color=TEXT)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    _legend(fig, timeline)
    return fig


def _draw(timeline: Timeline, prefix: str) -> tuple[Figure, _Tips]:
    tips = _Tips(prefix)
    fig = _figure(timeline)
    (ax,) = fig.axes
    _bars(ax, timeline, tips)
    _marks(ax, timeline, tips)
    return fig, tips


def timeline_png(timeline: Timeline) -> bytes:
    """The timeline as PNG bytes (RGBA, `WIDTH_IN` × `DPI` pixels wide)."""
    fig, _ = _draw(timeline, "timeline")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def timeline_svg(timeline: Timeline, prefix: str = "timeline") -> str:
    """The timeline as a standalone SVG document, text as text, tooltips as <title>s; `prefix`
    keeps its ids apart from another picture's in the same page."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
        fig, tips = _draw(timeline, prefix)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return _prefix_ids(tips.add_to(buffer.getvalue()), prefix)


def inline_svg(svg: str) -> str:
    """An SVG document as an element to put inside HTML (no XML declaration or doctype)."""
    return svg[svg.index("<svg") :]


def gpu_svg(gpu: dict[str, Any], wall_s: float, prefix: str = "gpu") -> str | None:
    """GPU utilisation over time as an SVG heat map: a row per node, a cell per time bucket of
    `trainctl.report.gpu.gpu_timeline` (its ``start`` is T+0), blank where a node sent no sample;
    None when no node sent any."""
    nodes: dict[str, list[float | None]] = gpu.get("nodes") or {}
    if not nodes:
        return None
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    size = float(gpu["bucket_s"])
    names = list(nodes)
    values = np.array(
        [[np.nan if v is None else v for v in nodes[name]] for name in names], dtype=float
    )
    edges = np.arange(values.shape[1] + 1) * size
    fig = Figure(figsize=(WIDTH_IN, 1.4 + 0.3 * len(names)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(names) + 1)
    mesh = ax.pcolormesh(
        edges, rows, values, cmap="viridis", vmin=0, vmax=100, edgecolors="face", linewidth=0
    )
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=9)
    ax.set_ylim(len(names), 0)
    wall = max(wall_s, size)
    ax.set_xlim(0, wall)
    ax.xaxis.set_major_locator(MultipleLocator(tick_step(wall)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"T+{format_duration(value)}"))
    ax.tick_params(labelsize=9)
    ax.set_title(
        f"GPU utilisation per node, mean % per {format_duration(size)} (blank: no sample)",
        fontsize=10,
        color=TEXT,
        loc="left",
    )
    fig.colorbar(mesh, ax=ax, label="GPU utilisation %", pad=0.01)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return _prefix_ids(buffer.getvalue(), prefix)
