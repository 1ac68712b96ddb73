"""Live progress records: each node's step, recent step times and last heartbeat, and the job's
step-time histogram — what the controller persists under ``jobs/<id>/progress/`` and what
`trainctl top` and `trainctl metrics` read back. Pure data and pure statistics: no I/O.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

STEP_TIME_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds of the step-time histogram (seconds); one more bucket holds the rest (+Inf)."""


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values` (`fraction` in [0, 1]); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[min(index, len(ordered) - 1)]


@dataclasses.dataclass(frozen=True)
class NodeProgress:
    """One node's progress as the controller last saw it."""

    node: str
    attempt: int | None
    step: int
    """The highest step any of the node's ranks reported."""
    beat_at: float
    """Wall-clock time the controller last received the node's progress (a heartbeat)."""
    step_p50_s: float | None
    step_p99_s: float | None
    """Median and 99th percentile of the node's recent per-rank step times."""
    steps_per_s: float | None
    """Steps completed per second over the recent window."""
    saving: bool = False
    """A rank of the node is saving a checkpoint."""

    def to_json(self) -> dict[str, Any]:
        # Field by field: `dataclasses.asdict` deep-copies through Python, a row per node
        # every few seconds (a third of the live view's write at 1,024 nodes).
        return {
            "type": "node",
            "node": self.node,
            "attempt": self.attempt,
            "step": self.step,
            "beat_at": self.beat_at,
            "step_p50_s": self.step_p50_s,
            "step_p99_s": self.step_p99_s,
            "steps_per_s": self.steps_per_s,
            "saving": self.saving,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeProgress:
        """A stored row; raises ValueError naming what does not fit."""
        try:
            return cls(
                node=str(data["node"]),
                attempt=None if data.get("attempt") is None else int(data["attempt"]),
                step=int(data["step"]),
                beat_at=float(data["beat_at"]),
                step_p50_s=_number(data.get("step_p50_s")),
                step_p99_s=_number(data.get("step_p99_s")),
                steps_per_s=_number(data.get("steps_per_s")),
                saving=bool(data.get("saving", False)),
            )
        except (KeyError, TypeError, ValueError) as bad:
            raise ValueError(f"not a node progress row: {bad!r}") from None


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class StepHistogram:
    """Step times observed (one per rank per step): counts per bucket of `bounds` (+Inf last),
    their sum and count. Cumulative since the controller started."""

    bounds: tuple[float, ...] = STEP_TIME_BUCKETS_S
    counts: tuple[int, ...] = ()
    """Per bucket, one more than `bounds` (empty: all zero)."""
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            object.__setattr__(self, "counts", (0,) * (len(self.bounds) + 1))
        if len(self.counts) != len(self.bounds) + 1 or list(self.bounds) != sorted(self.bounds):
            raise ValueError("a histogram needs sorted bounds and one count more than bounds")

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, values: Sequence[float]) -> StepHistogram:
        """A new histogram with `values` added."""
        counts = list(self.counts)
        for value in values:
            counts[bisect.bisect_left(self.bounds, value)] += 1
        return dataclasses.replace(self, counts=tuple(counts), sum_s=self.sum_s + sum(values))

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations <= it), +Inf last."""
        running, out = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "histogram",
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum_s": self.sum_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepHistogram:
        try:
            bounds = tuple(float(b) for b in data["bounds"])
            counts = tuple(int(c) for c in data["counts"])
            return cls(bounds, counts or (0,), float(data["sum_s"]))
        except (KeyError, TypeError, ValueError) as bad:
            raise ValueError(f"not a step-time histogram row: {bad!r}") from None


@dataclasses.dataclass(frozen=True)
class ProgressView:
    """The controller's whole progress view: per node, and the job's histogram."""

    nodes: dict[str, NodeProgress]
    histogram: StepHistogram
    written_at: float | None = None

    def to_rows(self) -> list[dict[str, Any]]:
        return [self.histogram.to_json(), *(p.to_json() for p in self.nodes.values())]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> tuple[ProgressView, list[str]]:
        """The view in stored rows, and a sentence per row that does not fit (skipped)."""
        nodes: dict[str, NodeProgress] = {}
        histogram = StepHistogram()
        problems: list[str] = []
        for number, row in enumerate(rows, 1):
            try:
                if row.get("type") == "histogram":
                    histogram = StepHistogram.from_json(row)
                elif row.get("type") == "node":
                    progress = NodeProgress.from_json(row)
                    nodes[progress.node] = progress
                else:
                    raise ValueError(f"unknown row type {row.get('type')!r}")
            except ValueError as bad:
                problems.append(f"row {number}: {bad}")
        return cls(dict(sorted(nodes.items())), histogram), problems


def steps_per_second(points: Sequence[tuple[float, int]]) -> float | None:
    """Throughput from (time, step) points, oldest first: steps done over the time they took;
    None with fewer than two points or no time between them."""
    if len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    if t1 <= t0:
        return None
    return max(0, s1 - s0) / (t1 - t0)
