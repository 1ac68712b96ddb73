"""The goodput timeline picture: one layout, drawn as SVG (inside a self-contained HTML page)
or as PNG.

`layout(ledger)` places everything once — a lane for the whole job and one per attempt,
segments coloured by category, failure markers (their reason as a tooltip), checkpoint ticks,
a time axis and a legend — as plain rectangles, vertical lines and text.
`trainctl.report.render` (`to_svg`, `to_html`, `to_png`) only draws that layout, so the
pictures agree; the PNG has no text (the rasteriser fills rectangles and lines). Pure: no
clock, no I/O, no network, no scripts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from trainctl.report.ledger import CATEGORIES, Category, Ledger, Segment

COLORS: dict[Category, str] = {
    Category.PRODUCTIVE: "#43a047",
    Category.CHECKPOINT_STALL: "#1e88e5",
    Category.STARTUP: "#fdd835",
    Category.FAILURE_DETECTION: "#e53935",
    Category.RESTART: "#fb8c00",
    Category.RESTORE: "#8e24aa",
    Category.REPLAYED: "#f48fb1",
    Category.WAITING: "#b0bec5",
}
"""One colour per category (the legend, the SVG and the PNG share it)."""

BACKGROUND = "#ffffff"
LANE = "#eef1f4"
"""Lane background: time not covered by the lane's attempt shows as this pale gap."""
AXIS = "#78909c"
TEXT = "#263238"
FAILURE = "#b71c1c"
CHECKPOINT = "#263238"

LEFT, RIGHT, TOP = 200, 24, 52
LANE_HEIGHT, LANE_GAP = 22, 10
TICK_HEIGHT = 7
LEGEND_COLUMNS, LEGEND_ROW = 4, 20


@dataclasses.dataclass(frozen=True)
class Rect:
    """A filled rectangle from (x0, y0) to (x1, y1); `title` is its tooltip."""

    x0: float
    y0: float
    x1: float
    y1: float
    color: str
    title: str = ""


@dataclasses.dataclass(frozen=True)
class Line:
    """A vertical line at `x` from `y0` to `y1`."""

    x: float
    y0: float
    y1: float
    color: str
    width: int = 1
    title: str = ""


@dataclasses.dataclass(frozen=True)
class Text:
    """A line of text (SVG only) with its baseline at `y`."""

    x: float
    y: float
    text: str
    anchor: str = "start"
    """SVG text-anchor: start, middle or end."""
    size: int = 12


@dataclasses.dataclass(frozen=True)
class Picture:
    """Everything to draw, in pixels, drawn in order: rectangles, then lines, then text."""

    width: int
    height: int
    title: str
    rects: tuple[Rect, ...]
    lines: tuple[Line, ...]
    texts: tuple[Text, ...]


def format_duration(seconds: float) -> str:
    """A compact duration: 0.4s, 42s, 12m03s, 5h07m."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        text = f"{seconds:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + "s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_share(seconds: float, wall_s: float) -> str:
    return f"{100 * seconds / wall_s:.1f}%" if wall_s > 0 else "-"


_TICK_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


def tick_step(wall_s: float, most: int = 10) -> float:
    """The smallest round interval that puts at most `most` ticks on the axis."""
    for step in _TICK_STEPS:
        if wall_s / step <= most:
            return step
    hours = math.ceil(wall_s / most / 3600)
    return 3600.0 * hours


@dataclasses.dataclass
class _Placement:
    """Shapes being placed, and how time maps to x."""

    start: float
    wall: float
    plot: float
    rects: list[Rect] = dataclasses.field(default_factory=list)
    lines: list[Line] = dataclasses.field(default_factory=list)
    texts: list[Text] = dataclasses.field(default_factory=list)

    @property
    def scale(self) -> float:
        """Pixels per second."""
        return self.plot / self.wall if self.wall > 0 else 0.0

    def x(self, time: float) -> float:
        return LEFT + min(max(time - self.start, 0.0), self.wall) * self.scale

    def at(self, time: float) -> str:
        return f"T+{format_duration(time - self.start)}"


MAX_LABELS = 3
"""A merged bar's tooltip names at most this many of its segments' labels."""


@dataclasses.dataclass
class _Bar:
    """What one drawn rectangle stands for: one segment, or a run of sub-pixel ones."""

    start: float
    end: float
    seconds: dict[Category, float]
    labels: list[str]

    @property
    def category(self) -> Category:
        """The category with the most time in the bar (its colour)."""
        return max(self.seconds, key=lambda c: self.seconds[c])

    def absorb(self, other: _Bar) -> None:
        self.end = other.end
        for category, seconds in other.seconds.items():
            self.seconds[category] = self.seconds.get(category, 0.0) + seconds
        for label in other.labels:
            if len(self.labels) >= MAX_LABELS:
                break
            if label and label not in self.labels:
                self.labels.append(label)

    def title(self, start: float, attempt: int | None) -> str:
        where = f"attempt {attempt}" if attempt is not None else "job"
        span = f"T+{format_duration(self.start - start)} to T+{format_duration(self.end - start)}"
        if len(self.seconds) == 1:
            label = f": {'; '.join(self.labels)}" if self.labels else ""
            duration = format_duration(self.end - self.start)
            return f"{self.category.value} {duration} ({where}{label}), {span}"
        mix = ", ".join(
            f"{category.value} {format_duration(seconds)}"
            for category, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        )
        return f"mostly {self.category.value} ({where}: {mix}), {span}"


def _bars(segments: Sequence[Segment], scale: float) -> list[_Bar]:
    """The rectangles worth drawing for one lane at `scale` pixels per second.

    Segments at least a pixel wide are drawn as they are; runs of narrower ones (a 0.1 s stall
    every 2 s of a day-long job) are grouped a pixel at a time and coloured by the category
    that dominates the group; touching bars of one colour are merged. The ledger keeps every
    segment; this only keeps the picture small and honest at its resolution.
    """
    bars: list[_Bar] = []
    group: _Bar | None = None

    def place(bar: _Bar) -> None:
        last = bars[-1] if bars else None
        if last and last.category is bar.category and (bar.start - last.end) * scale < 1:
            last.absorb(bar)
        else:
            bars.append(bar)

    for segment in segments:
        labels = [segment.label] if segment.label else []
        bar = _Bar(segment.start, segment.end, {segment.category: segment.duration}, labels)
        if group is not None and (segment.start - group.end) * scale >= 1:
            place(group)
            group = None
        if segment.duration * scale >= 1:
            if group is not None:
                place(group)
                group = None
            place(bar)
            continue
        if group is None:
            group = bar
        else:
            group.absorb(bar)
        if (group.end - group.start) * scale >= 1:
            place(group)
            group = None
    if group is not None:
        place(group)
    return bars


def _lanes(placement: _Placement, ledger: Ledger) -> tuple[dict[int | None, float], float]:
    """The job lane (every segment) and one lane per attempt (its own segments only, so the
    time between attempts shows as a gap); returns each lane's top and the lanes' bottom."""
    lanes: list[tuple[str, int | None]] = [("job", None)]
    for row in ledger.attempts:
        world = f", world {row.world_size}" if row.world_size else ""
        lanes.append((f"attempt {row.number}: {len(row.nodes)} node(s){world}", row.number))
    tops: dict[int | None, float] = {}
    for index, (name, number) in enumerate(lanes):
        top = TOP + index * (LANE_HEIGHT + LANE_GAP)
        tops.setdefault(number, top)
        placement.rects.append(Rect(LEFT, top, LEFT + placement.plot, top + LANE_HEIGHT, LANE))
        placement.texts.append(Text(LEFT - 8, top + 15, name, anchor="end"))
        own = [s for s in ledger.segments if number is None or s.attempt == number]
        for bar in _bars(own, placement.scale):
            tip = bar.title(ledger.start, number)
            color = COLORS[bar.category]
            left, right = placement.x(bar.start), placement.x(bar.end)
            placement.rects.append(Rect(left, top, right, top + LANE_HEIGHT, color, tip))
    return tops, TOP + len(lanes) * (LANE_HEIGHT + LANE_GAP) - LANE_GAP


def _markers(
    placement: _Placement, ledger: Ledger, tops: dict[int | None, float], bottom: float
) -> None:
    """Checkpoint ticks at the foot of their attempt's lane (at most one per 2 pixels);
    failures across every lane."""
    last_tick: dict[int | None, float] = {}
    for mark in ledger.checkpoints:
        x = placement.x(mark.time)
        if x - last_tick.get(mark.attempt, -math.inf) < 2:
            continue
        last_tick[mark.attempt] = x
        top = tops.get(mark.attempt, TOP) + LANE_HEIGHT
        tip = f"checkpoint step {mark.step} committed at {placement.at(mark.time)}"
        if mark.stall_s:
            tip += f", stalled training {format_duration(mark.stall_s)}"
        placement.lines.append(Line(x, top - TICK_HEIGHT, top, CHECKPOINT, 1, tip))
    for failure in ledger.failures:
        where = f" on {failure.node}" if failure.node else ""
        cause = f" ({failure.cause})" if failure.cause else ""
        reason = failure.reason or "no reason given"
        tip = (
            f"attempt {failure.attempt} {failure.outcome}{where}{cause} "
            f"at {placement.at(failure.time)}: {reason}"
        )
        x = placement.x(failure.time)
        placement.lines.append(Line(x, TOP - 6, bottom, FAILURE, 2, tip))
        placement.rects.append(Rect(x - 5, TOP - 14, x + 5, TOP - 4, FAILURE, tip))


def _axis(placement: _Placement, y: float) -> None:
    placement.rects.append(Rect(LEFT, y, LEFT + placement.plot, y + 1, AXIS))
    step = tick_step(placement.wall)
    count = int(placement.wall / step) if placement.wall > 0 else 0
    for index in range(count + 1):
        x = placement.x(placement.start + index * step)
        placement.lines.append(Line(x, y, y + 5, AXIS))
        label = f"T+{format_duration(index * step)}"
        placement.texts.append(Text(x, y + 18, label, anchor="middle"))


def _legend(placement: _Placement, ledger: Ledger, y: float, width: int) -> float:
    """A swatch, seconds and share per category; returns the legend's bottom."""
    totals = ledger.seconds
    column = (width - 24) / LEGEND_COLUMNS
    for index, category in enumerate(CATEGORIES):
        left = 12 + (index % LEGEND_COLUMNS) * column
        top = y + (index // LEGEND_COLUMNS) * LEGEND_ROW
        seconds = totals[category.value]
        text = (
            f"{category.value} {format_duration(seconds)} ({format_share(seconds, placement.wall)})"
        )
        placement.rects.append(Rect(left, top, left + 12, top + 12, COLORS[category], text))
        placement.texts.append(Text(left + 18, top + 11, text))
    return y + math.ceil(len(CATEGORIES) / LEGEND_COLUMNS) * LEGEND_ROW


def layout(ledger: Ledger, width: int = 1200) -> Picture:
    """Place the timeline of `ledger` on a `width`-pixel-wide picture."""
    placement = _Placement(ledger.start, ledger.wall_s, float(width - LEFT - RIGHT))
    running = ", running" if ledger.live else ""
    title = (
        f"{ledger.job_id} ({ledger.state}{running}): goodput "
        f"{format_share(ledger.seconds[Category.PRODUCTIVE.value], ledger.wall_s)} "
        f"of {format_duration(ledger.wall_s)}"
    )
    placement.texts.append(Text(12, 22, title, size=15))
    tops, bottom = _lanes(placement, ledger)
    _markers(placement, ledger, tops, bottom)
    _axis(placement, bottom + 8)
    height = int(_legend(placement, ledger, bottom + 42, width) + 8)
    return Picture(
        width, height, title, tuple(placement.rects), tuple(placement.lines), tuple(placement.texts)
    )


# -- drawing ---------------------------------------------------------------------------------------
