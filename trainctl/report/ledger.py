"""The goodput ledger's types: categories of wall time, segments, attempts, failures.

`trainctl.report.goodput.build_ledger` fills a `Ledger`; the timeline picture and
`trainctl report` read it. Pure data: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Category(str, enum.Enum):
    """Where a second of wall time went. Every second is in exactly one category."""

    PRODUCTIVE = "productive"
    """Completing steps for the first time (checkpoint stalls excluded)."""
    CHECKPOINT_STALL = "checkpoint_stall"
    """Training blocked by a checkpoint save (``stall_s`` of ``checkpoint_committed``)."""
    STARTUP = "startup"
    """Job start → first completed step of the first attempt, restore excluded."""
    FAILURE_DETECTION = "failure_detection"
    """The failure happened → the controller decided what to do about it."""
    RESTART = "restart"
    """Decided (or resumed) → first completed step of the next attempt, restore excluded."""
    RESTORE = "restore"
    """Loading a checkpoint (``restore_s`` of ``checkpoint_restored``)."""
    REPLAYED = "replayed"
    """Redoing steps an earlier attempt had already completed."""
    WAITING = "waiting"
    """Nobody was making progress or recovering: pending, a dead controller, shutdown, the rest."""


CATEGORIES: tuple[Category, ...] = tuple(Category)

SUCCEEDED, FAILED, STOPPED = "succeeded", "failed", "stopped"
CONTROLLER_LOST, RUNNING, UNKNOWN = "controller_lost", "running", "unknown"
"""Attempt outcomes: the ``attempt_ended`` values, plus ``running`` (live) and ``unknown``."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of wall time `[start, end)` spent in one category."""

    start: float
    end: float
    category: Category
    attempt: int | None
    """The attempt it belongs to; None between attempts and before the first."""
    label: str

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "category": self.category.value,
            "attempt": self.attempt,
            "label": self.label,
        }


@dataclasses.dataclass(frozen=True)
class AttemptRow:
    """One attempt as the ledger understood it (every field may be unknown: None)."""

    number: int
    nodes: tuple[str, ...]
    world_size: int | None
    started_at: float
    first_step_at: float | None
    ended_at: float | None
    restored_step: int | None
    first_step: int | None
    last_step: int | None
    last_step_at: float | None
    failed_at: float | None
    """When the failure happened, by the best evidence (an injected fault, else the report)."""
    decided_at: float | None
    outcome: str
    """succeeded, failed, stopped, controller_lost, running (live) or unknown."""
    reason: str
    cause: str | None
    blamed: str | None
    restore_s: float | None
    mean_step_s: float | None
    restore_tier: str | None = None
    """Where the restore read the step: ``memory`` (host memory) or ``durable`` (storage)."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["nodes"] = list(self.nodes)
        return data


@dataclasses.dataclass(frozen=True)
class Failure:
    """An attempt that ended without succeeding: when, where, why."""

    time: float
    attempt: int
    node: str | None
    cause: str | None
    reason: str
    outcome: str
    fault: str | None
    """The injected fault behind it, if one was injected (e.g. ``kill-node``)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CheckpointMark:
    """A committed checkpoint: when the commit was reported, which step, how long it stalled."""

    time: float
    step: int | None
    attempt: int
    stall_s: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A node taken out of the job (``node_excluded``): when, which, after which attempt, why."""

    time: float
    node: str | None
    attempt: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Ledger:
    """A job's wall time, cut into categories; `seconds` sums to `wall_s`."""

    job_id: str
    state: str
    start: float
    end: float
    live: bool
    """The job has not ended: `end` is the `now` the ledger was built at."""
    segments: tuple[Segment, ...]
    attempts: tuple[AttemptRow, ...]
    failures: tuple[Failure, ...]
    checkpoints: tuple[CheckpointMark, ...]
    exclusions: tuple[Exclusion, ...] = ()

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def seconds(self) -> dict[str, float]:
        """Category name → seconds, every category present, in `CATEGORIES` order."""
        totals = dict.fromkeys((c.value for c in CATEGORIES), 0.0)
        for segment in self.segments:
            totals[segment.category.value] += segment.duration
        return totals

    @property
    def goodput(self) -> float:
        """Productive share of the wall time (0 for a job with no wall time yet)."""
        wall = self.wall_s
        return self.seconds[Category.PRODUCTIVE.value] / wall if wall > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "start": self.start,
            "end": self.end,
            "live": self.live,
            "wall_s": self.wall_s,
            "goodput": self.goodput,
            "categories": self.seconds,
            "attempts": [a.to_json() for a in self.attempts],
            "failures": [f.to_json() for f in self.failures],
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "exclusions": [x.to_json() for x in self.exclusions],
            "segments": [s.to_json() for s in self.segments],
        }
