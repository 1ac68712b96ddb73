"""The goodput timeline as data: lanes of coloured bars and marks, in seconds since job start.

`build_timeline(ledger)` decides everything the picture shows — a lane for the whole job, one
lane per (attempt, node) named like ``attempt 2 · node-1``, bars coloured by ledger category,
and marks for failures (labelled ``node-1: node_fault``), durable checkpoint commits, restores
and node exclusions, each with a tooltip. `trainctl.report.draw` only draws it (matplotlib), so
the PNG, the SVG and the HTML page agree. Pure: no clock, no I/O, no plotting library.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from collections.abc import Sequence

from trainctl.report.ledger import (
    CATEGORIES,
    AttemptRow,
    Category,
    Exclusion,
    Failure,
    Ledger,
    Segment,
)

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
"""One colour per category (the legend, the pictures and the HTML tables share it)."""

RESOLUTION = 1000
"""Bars narrower than 1/RESOLUTION of the wall time are grouped (about a pixel when drawn)."""
MAX_NODE_LANES = 8
"""An attempt with more nodes shows only the nodes with a mark, the rest as one lane."""
MAX_LABELS = 3
"""A grouped bar's tooltip names at most this many of its segments' labels."""


class MarkKind(str, enum.Enum):
    """What a mark on the timeline stands for; the value is its legend entry."""

    FAILURE = "failure (node: cause)"
    CHECKPOINT = "checkpoint committed (durable)"
    RESTORE = "checkpoint restored"
    EXCLUSION = "node excluded"


@dataclasses.dataclass(frozen=True)
class Bar:
    """A stretch `[start_s, end_s)` of one lane, coloured by `category` (what dominates it)."""

    start_s: float
    end_s: float
    category: Category
    tooltip: str


@dataclasses.dataclass(frozen=True)
class Lane:
    """One row of the picture: the whole job (`attempt` None) or one attempt on one node (or
    on a group of nodes, `node` None)."""

    name: str
    attempt: int | None
    node: str | None
    bars: tuple[Bar, ...]


@dataclasses.dataclass(frozen=True)
class Mark:
    """A point in time on some lanes (indices into `Timeline.lanes`); `label` is drawn beside
    it (failures only), `tooltip` says everything."""

    kind: MarkKind
    time_s: float
    lanes: tuple[int, ...]
    label: str
    tooltip: str


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Everything the picture shows; times are seconds since `start` (epoch seconds)."""

    title: str
    subtitle: str
    """The wall clock: when the job started and ended (UTC)."""
    start: float
    wall_s: float
    lanes: tuple[Lane, ...]
    marks: tuple[Mark, ...]
    legend: tuple[tuple[Category, str], ...]
    """Each category with its legend text (seconds and share)."""


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


def format_clock(epoch_s: float) -> str:
    """An epoch time as UTC wall clock: 2026-12-04 13:05:09 UTC."""
    moment = datetime.datetime.fromtimestamp(epoch_s, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


_TICK_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


def tick_step(wall_s: float, most: int = 10) -> float:
    """The smallest round interval that puts at most `most` ticks on the time axis."""
    for step in _TICK_STEPS:
        if wall_s / step <= most:
            return float(step)
    return 3600.0 * math.ceil(wall_s / most / 3600)


# -- bars ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Group:
    """What one bar stands for: one segment, or a run of too-thin ones."""

    start: float
    end: float
    seconds: dict[Category, float]
    labels: list[str]

    @property
    def category(self) -> Category:
        return max(self.seconds, key=lambda c: self.seconds[c])

    def absorb(self, other: _Group) -> None:
        self.end = other.end
        for category, seconds in other.seconds.items():
            self.seconds[category] = self.seconds.get(category, 0.0) + seconds
        for label in other.labels:
            if len(self.labels) >= MAX_LABELS:
                break
            if label and label not in self.labels:
                self.labels.append(label)

    def bar(self, job_start: float, where: str) -> Bar:
        since, until = self.start - job_start, self.end - job_start
        span = f"T+{format_duration(since)} to T+{format_duration(until)}"
        if len(self.seconds) == 1:
            label = f": {'; '.join(self.labels)}" if self.labels else ""
            duration = format_duration(self.end - self.start)
            tip = f"{self.category.value} {duration} ({where}{label}), {span}"
        else:
            mix = ", ".join(
                f"{category.value} {format_duration(seconds)}"
                for category, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])
            )
            tip = f"mostly {self.category.value} ({where}: {mix}), {span}"
        return Bar(self.start - job_start, self.end - job_start, self.category, tip)


def group_segments(segments: Sequence[Segment], min_s: float) -> list[_Group]:
    """The bars worth drawing for one lane when `min_s` seconds is the smallest visible width.

    Segments at least `min_s` long stay as they are; runs of shorter ones (a 0.1 s stall every
    2 s of a day-long job) are grouped `min_s` at a time and coloured by the category that
    dominates the group; touching groups of one colour merge. The ledger keeps every segment;
    this keeps the picture small and honest at its resolution.
    """
    groups: list[_Group] = []
    pending: _Group | None = None

    def place(group: _Group) -> None:
        last = groups[-1] if groups else None
        if last and last.category is group.category and group.start - last.end < min_s:
            last.absorb(group)
        else:
            groups.append(group)

    for segment in segments:
        labels = [segment.label] if segment.label else []
        group = _Group(segment.start, segment.end, {segment.category: segment.duration}, labels)
        if pending is not None and segment.start - pending.end >= min_s:
            place(pending)
            pending = None
        if segment.duration >= min_s:
            if pending is not None:
                place(pending)
                pending = None
            place(group)
            continue
        if pending is None:
            pending = group
        else:
            pending.absorb(group)
        if pending.end - pending.start >= min_s:
            place(pending)
            pending = None
    if pending is not None:
        place(pending)
    return groups


# -- lanes -----------------------------------------------------------------------------------------
def lane_name(attempt: int, node: str | None, num_others: int = 0) -> str:
    """``attempt 2 · node-1``; ``attempt 2 · 62 other nodes`` for a group; ``attempt 2``."""
    if node is not None:
        return f"attempt {attempt} · {node}"
    if num_others:
        return f"attempt {attempt} · {num_others} other node{'s' if num_others != 1 else ''}"
    return f"attempt {attempt}"


def _marked_nodes(ledger: Ledger, attempt: int) -> set[str]:
    failed = {f.node for f in ledger.failures if f.attempt == attempt and f.node}
    excluded = {x.node for x in ledger.exclusions if x.attempt == attempt and x.node}
    return failed | excluded


def _attempt_lanes(row: AttemptRow, ledger: Ledger, min_s: float) -> list[Lane]:
    segments = [s for s in ledger.segments if s.attempt == row.number]
    where = f"attempt {row.number}"
    bars = tuple(g.bar(ledger.start, where) for g in group_segments(segments, min_s))
    if not row.nodes:
        return [Lane(lane_name(row.number, None), row.number, None, bars)]
    if len(row.nodes) <= MAX_NODE_LANES:
        shown, others = list(row.nodes), 0
    else:
        marked = _marked_nodes(ledger, row.number)
        shown = [n for n in row.nodes if n in marked]
        others = len(row.nodes) - len(shown)
    lanes = [Lane(lane_name(row.number, node), row.number, node, bars) for node in shown]
    if others:
        lanes.append(Lane(lane_name(row.number, None, others), row.number, None, bars))
    return lanes


def _lanes(ledger: Ledger, min_s: float) -> list[Lane]:
    """The job lane (every segment, so the time between attempts shows), then each attempt's."""
    job_bars = tuple(g.bar(ledger.start, "job") for g in group_segments(ledger.segments, min_s))
    lanes = [Lane("job", None, None, job_bars)]
    for row in ledger.attempts:
        lanes += _attempt_lanes(row, ledger, min_s)
    return lanes


# -- marks -----------------------------------------------------------------------------------------
def _lanes_of(
    lanes: Sequence[Lane], attempt: int | None, node: str | None = None
) -> tuple[int, ...]:
    """The lanes of `attempt` (of its `node` when that node has a lane); the job lane when the
    attempt has none."""
    own = [i for i, lane in enumerate(lanes) if attempt is not None and lane.attempt == attempt]
    on_node = [i for i in own if node is not None and lanes[i].node == node]
    return tuple(on_node or own or [0])


def failure_label(failure: Failure) -> str:
    """What is written beside a failure: ``node-1: node_fault``, or the cause alone."""
    what = failure.cause or failure.outcome
    return f"{failure.node}: {what}" if failure.node else what


def _failure_marks(ledger: Ledger, lanes: Sequence[Lane]) -> list[Mark]:
    marks = []
    for failure in ledger.failures:
        where = f" on {failure.node}" if failure.node else ""
        cause = f" ({failure.cause})" if failure.cause else ""
        fault = f", injected {failure.fault}" if failure.fault else ""
        tip = (
            f"attempt {failure.attempt} {failure.outcome}{where}{cause}{fault} at "
            f"T+{format_duration(failure.time - ledger.start)}: "
            f"{failure.reason or 'no reason given'}"
        )
        marks.append(
            Mark(
                MarkKind.FAILURE,
                failure.time - ledger.start,
                _lanes_of(lanes, failure.attempt, failure.node),
                failure_label(failure),
                tip,
            )
        )
    return marks


def _checkpoint_marks(ledger: Ledger, lanes: Sequence[Lane], min_s: float) -> list[Mark]:
    """One mark per committed checkpoint, at most one per `min_s` per attempt (thousands of
    commits in a long job would be one black smear)."""
    marks: list[Mark] = []
    last: dict[int, float] = {}
    for mark in ledger.checkpoints:
        if mark.time - last.get(mark.attempt, -math.inf) < min_s:
            continue
        last[mark.attempt] = mark.time
        at = format_duration(mark.time - ledger.start)
        tip = f"checkpoint step {mark.step} committed (durable) at T+{at}"
        if mark.stall_s:
            tip += f", stalled training {format_duration(mark.stall_s)}"
        lane_ids = _lanes_of(lanes, mark.attempt)
        marks.append(Mark(MarkKind.CHECKPOINT, mark.time - ledger.start, lane_ids, "", tip))
    return marks


def _restore_marks(ledger: Ledger, lanes: Sequence[Lane]) -> list[Mark]:
    """A mark where each restore finished (the end of its ``restore`` segment)."""
    return [
        Mark(
            MarkKind.RESTORE,
            s.end - ledger.start,
            _lanes_of(lanes, s.attempt),
            "",
            f"{s.label or 'restore'} took {format_duration(s.duration)}, done at "
            f"T+{format_duration(s.end - ledger.start)}",
        )
        for s in ledger.segments
        if s.category is Category.RESTORE
    ]


def _exclusion_attempt(ledger: Ledger, exclusion: Exclusion) -> int | None:
    """The exclusion's attempt, else the latest attempt started by then that ran on the node."""
    if exclusion.attempt is not None:
        return exclusion.attempt
    ran = [
        a.number
        for a in ledger.attempts
        if a.started_at <= exclusion.time and (exclusion.node in a.nodes or not a.nodes)
    ]
    return ran[-1] if ran else None


def _exclusion_marks(ledger: Ledger, lanes: Sequence[Lane]) -> list[Mark]:
    marks = []
    for exclusion in ledger.exclusions:
        attempt = _exclusion_attempt(ledger, exclusion)
        node = exclusion.node or "a node"
        at = format_duration(exclusion.time - ledger.start)
        tip = f"{node} excluded at T+{at}: {exclusion.reason or 'no reason given'}"
        lane_ids = _lanes_of(lanes, attempt, exclusion.node)
        marks.append(Mark(MarkKind.EXCLUSION, exclusion.time - ledger.start, lane_ids, "", tip))
    return marks


def build_timeline(ledger: Ledger, resolution: int = RESOLUTION) -> Timeline:
    """Decide what the timeline picture of `ledger` shows (bars narrower than
    1/`resolution` of the wall time are grouped)."""
    wall = max(ledger.wall_s, 0.0)
    min_s = wall / resolution if wall > 0 else math.inf
    lanes = _lanes(ledger, min_s)
    marks = (
        _restore_marks(ledger, lanes)
        + _checkpoint_marks(ledger, lanes, min_s)
        + _exclusion_marks(ledger, lanes)
        + _failure_marks(ledger, lanes)
    )
    totals = ledger.seconds
    productive = format_share(totals[Category.PRODUCTIVE.value], wall)
    title = f"{ledger.job_id} ({ledger.state}): goodput {productive} of {format_duration(wall)}"
    until = format_clock(ledger.end) + (" (not ended yet)" if ledger.live else "")
    legend = tuple(
        (c, f"{c.value} {format_duration(totals[c.value])} ({format_share(totals[c.value], wall)})")
        for c in CATEGORIES
    )
    return Timeline(
        title=title,
        subtitle=f"{format_clock(ledger.start)} to {until}",
        start=ledger.start,
        wall_s=wall,
        lanes=tuple(lanes),
        marks=tuple(marks),
        legend=legend,
    )
