"""The goodput ledger: where every second of a job's wall-clock time went.

`build_ledger(record, events, now)` is pure (no clock, no I/O): it reads the job's state record
and its event log and cuts the job's wall time — from its first ``job_created`` or
``attempt_started`` event to its end event (or `now` while it runs) — into consecutive
`Segment`s, each of exactly one `Category`. The categories therefore sum to the wall time by
construction, whatever the input: missing events, a controller that died mid-attempt, attempts
whose times overlap. ``goodput = productive / wall``.

How one attempt is cut (times are the best evidence available; see `_resolve`)::

    attempt started ─► first step ─────────► last step ─► failure ─► decided
    │ startup (1st)   │ productive, less      │ waiting     │ failure_detection
    │ or restart,     │ checkpoint stalls and │ (lost work) │
    │ less restore    │ replayed steps        │             │

and between attempts: ``restart`` for a relaunch inside the allocation (decided → next first
step), ``waiting`` while nobody was driving the job (a dead controller until ``trainctl resume``,
a requeued job pending) followed by ``restart`` from the resume.

Conventions worth knowing:

- A step counts as productive the first time it completes; completing it again in a later
  attempt (after restoring an older checkpoint) is ``replayed``. The first step after a restore
  is already inside ``restart`` (decided → first completed step), so ``replayed`` covers the
  remaining ``high-water step − first step`` steps at the new attempt's mean step time, where the
  high-water step is the highest step any earlier attempt reported. If the new attempt never got
  past the high-water step, all its step time is replayed.
- A checkpoint stall is drawn where the save was called (commit time − ``durable_s``).
- Time after the last reported step of a live attempt is ``waiting`` ("no step reported since"):
  it is not known to be productive until a step completes, and a controller that died without
  anyone noticing shows up as a growing wait instead of as phantom progress.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainctl.state import AttemptRecord, AttemptState, Event, JobRecord, JobState


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

JOB_END_KINDS = frozenset({"job_succeeded", "job_failed", "job_stopped", "job_gave_up"})
"""Events that end a job (a later ``job_resumed`` and ``attempt_started`` may continue it)."""

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
            "segments": [s.to_json() for s in self.segments],
        }


# -- tolerant field readers ----------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A finite number from an event field, or None (missing, null, text, NaN, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _data(event: Event) -> Mapping[str, Any]:
    return event.data if isinstance(event.data, Mapping) else {}


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


# -- one attempt, merged from state.json and the events -----------------------------------------
@dataclasses.dataclass
class _Attempt:
    """Everything known about one attempt number; events win over the state record."""

    number: int
    record: AttemptRecord | None = None
    started: Event | None = None
    ended: Event | None = None
    first: Event | None = None
    restored: list[Event] = dataclasses.field(default_factory=list)
    committed: list[Event] = dataclasses.field(default_factory=list)
    faults: list[Event] = dataclasses.field(default_factory=list)
    last_seen: float | None = None
    """Time of the newest event the attempt's own controller wrote (liveness evidence)."""
    started_at: float = 0.0
    """Set by `_collect_attempts`."""

    # Resolved by `_resolve`:
    first_step_at: float | None = None
    last_step_at: float | None = None
    failed_at: float | None = None
    decided_at: float | None = None
    ended_at: float | None = None
    outcome: str = UNKNOWN
    restore_s: float | None = None
    mean_step_s: float | None = None

    def ended_field(self, key: str) -> Any:
        return _data(self.ended).get(key) if self.ended is not None else None

    def record_field(self, key: str) -> Any:
        """A field of state.json's attempt (unchecked: read it through `_num`/`_int`/`_text`)."""
        return getattr(self.record, key, None) if self.record is not None else None

    @property
    def first_step(self) -> int | None:
        from_event = _int(_data(self.first).get("step")) if self.first is not None else None
        return _first(
            from_event,
            _int(self.ended_field("first_step")),
            _int(self.record_field("first_step")),
        )

    @property
    def last_step(self) -> int | None:
        return _first(_int(self.ended_field("last_step")), _int(self.record_field("last_step")))

    @property
    def restored_step(self) -> int | None:
        """The checkpoint step this attempt restored; None when it restored none."""
        restored = [_int(_data(e).get("step")) for e in self.restored]
        from_first = _int(_data(self.first).get("restored_step")) if self.first else None
        step = _first(
            *restored,
            from_first,
            _int(self.ended_field("restored_step")),
            _int(self.record_field("restored_step")),
        )
        return step or None  # 0 means "none" in `first_step`

    @property
    def cause(self) -> str | None:
        return _first(_text(self.ended_field("cause")), _text(self.record_field("cause")))

    @property
    def blamed(self) -> str | None:
        return _first(_text(self.ended_field("blamed")), _text(self.record_field("blamed")))

    @property
    def reason(self) -> str:
        return _first(_text(self.ended_field("reason")), _text(self.record_field("reason"))) or ""

    @property
    def nodes(self) -> tuple[str, ...]:
        nodes = _data(self.started).get("nodes") if self.started is not None else None
        if not isinstance(nodes, list):
            nodes = self.record_field("nodes")
        if not isinstance(nodes, list):
            nodes = []
        return tuple(str(n) for n in nodes)

    @property
    def world_size(self) -> int | None:
        from_event = _int(_data(self.started).get("world_size")) if self.started else None
        return _first(from_event, _int(self.record_field("world_size")) or None)

    @property
    def fault(self) -> Event | None:
        return self.faults[0] if self.faults else None

    def row(self) -> AttemptRow:
        return AttemptRow(
            number=self.number,
            nodes=self.nodes,
            world_size=self.world_size,
            started_at=self.started_at,
            first_step_at=self.first_step_at,
            ended_at=self.ended_at,
            restored_step=self.restored_step,
            first_step=self.first_step,
            last_step=self.last_step,
            last_step_at=self.last_step_at,
            failed_at=self.failed_at,
            decided_at=self.decided_at,
            outcome=self.outcome,
            reason=self.reason,
            cause=self.cause,
            blamed=self.blamed,
            restore_s=self.restore_s,
            mean_step_s=self.mean_step_s,
        )


def _ended_badly(outcome: str) -> bool:
    """An attempt its controller ended without success (failed, stopped, or an outcome this
    version does not know yet): its failure was detected and decided on."""
    return outcome not in (SUCCEEDED, CONTROLLER_LOST, RUNNING, UNKNOWN)


_OUTCOME_OF_STATE = {
    AttemptState.SUCCEEDED: SUCCEEDED,
    AttemptState.FAILED: FAILED,
    AttemptState.STOPPED: STOPPED,
}


def _collect_attempts(record: JobRecord, events: Sequence[Event]) -> list[_Attempt]:
    """Merge state.json's attempts with the attempt events, ordered by start time.

    Attempts are keyed by number: duplicated events for one number collapse (earliest start,
    latest end). An attempt with no start time anywhere borrows its earliest known time; one
    with no time at all is dropped.
    """
    attempts: dict[int, _Attempt] = {}
    for attempt_record in record.attempts:
        attempts[attempt_record.number] = _Attempt(attempt_record.number, record=attempt_record)
    for event in events:
        number = _int(event.attempt)
        if event.kind == "attempt_started":
            number = number if number is not None else max(attempts, default=0) + 1
            attempt = attempts.setdefault(number, _Attempt(number))
            if attempt.started is None:
                attempt.started = event
        elif event.kind == "attempt_ended" and number is not None:
            attempts.setdefault(number, _Attempt(number)).ended = event
    kept = []
    for attempt in attempts.values():
        start = _first(
            attempt.started.time if attempt.started else None,
            _num(attempt.record_field("started_at")),
        )
        if start is None:
            later = [
                _num(attempt.ended_field(key))
                for key in ("first_step_at", "last_step_at", "failed_at", "decided_at")
            ]
            later.append(attempt.ended.time if attempt.ended else None)
            start = min((t for t in later if t is not None), default=None)
        if start is not None:
            attempt.started_at = start
            kept.append(attempt)
    return sorted(kept, key=lambda a: (a.started_at, a.number))


def _owner(attempts: Sequence[_Attempt], event: Event) -> _Attempt | None:
    """The attempt an event belongs to: by its number, else by time (the latest one started)."""
    number = _int(event.attempt)
    if number is not None:
        return next((a for a in attempts if a.number == number), None)
    started = [a for a in attempts if a.started_at <= event.time]
    return started[-1] if started else None


def _attach_events(attempts: Sequence[_Attempt], events: Sequence[Event]) -> None:
    for event in events:
        owner = _owner(attempts, event)
        if owner is None:
            continue
        if event.kind == "first_step" and owner.first is None:
            owner.first = event
        elif event.kind == "checkpoint_restored":
            owner.restored.append(event)
        elif event.kind == "checkpoint_committed":
            owner.committed.append(event)
        elif event.kind == "fault_injected":
            owner.faults.append(event)
        if event is not owner.ended and event.kind not in JOB_END_KINDS | {"job_resumed"}:
            owner.last_seen = max(owner.last_seen or event.time, event.time)


def _mean_step_s(attempt: _Attempt) -> float | None:
    first, last = attempt.first_step, attempt.last_step
    if None in (first, last, attempt.first_step_at, attempt.last_step_at):
        return None
    assert first is not None and last is not None
    assert attempt.first_step_at is not None and attempt.last_step_at is not None
    steps, seconds = last - first, attempt.last_step_at - attempt.first_step_at
    return seconds / steps if steps > 0 and seconds > 0 else None


def _resolve(attempt: _Attempt, is_last: bool, job_live: bool) -> None:
    """Pick each time and the outcome from the best evidence available."""
    first_event_at = attempt.first.time if attempt.first is not None else None
    attempt.first_step_at = _first(
        first_event_at,
        _num(attempt.ended_field("first_step_at")),
        _num(attempt.record_field("first_step_at")),
    )
    attempt.last_step_at = _first(
        _num(attempt.ended_field("last_step_at")), _num(attempt.record_field("last_step_at"))
    )
    if attempt.first_step_at is not None and attempt.last_step_at is not None:
        attempt.last_step_at = max(attempt.last_step_at, attempt.first_step_at)
    elif attempt.first_step_at is not None:
        attempt.last_step_at = attempt.first_step_at
    ended_at = attempt.ended.time if attempt.ended is not None else None
    attempt.ended_at = _first(ended_at, _num(attempt.record_field("ended_at")))
    attempt.decided_at = _first(_num(attempt.ended_field("decided_at")), attempt.ended_at)

    outcome = _text(attempt.ended_field("outcome"))
    if outcome is None and attempt.record is not None:
        outcome = _OUTCOME_OF_STATE.get(attempt.record.state)
        if outcome is not None and attempt.record.cause == CONTROLLER_LOST:
            outcome = CONTROLLER_LOST
    if outcome is None:
        outcome = RUNNING if is_last and job_live and attempt.ended is None else UNKNOWN
    attempt.outcome = outcome

    if _ended_badly(outcome):
        # The spec'd order of evidence: an injected fault, else the last progress before the
        # failure; the controller's own `failed_at` (often when it *observed* the failure, e.g.
        # a hang's detection) only when the attempt never reported a step.
        fault_at = attempt.fault.time if attempt.fault is not None else None
        attempt.failed_at = _first(
            fault_at,
            attempt.last_step_at,
            _num(attempt.ended_field("failed_at")),
            attempt.decided_at,
        )
    elif outcome in (CONTROLLER_LOST, UNKNOWN):
        attempt.failed_at = _first(attempt.last_step_at, attempt.last_seen, attempt.started_at)
    restores = [_num(_data(e).get("restore_s")) for e in attempt.restored]
    attempt.restore_s = max((r for r in restores if r is not None and r > 0), default=None)
    attempt.mean_step_s = _mean_step_s(attempt)


# -- the job's span --------------------------------------------------------------------------------
def _job_span(
    record: JobRecord, events: Sequence[Event], attempts: Sequence[_Attempt], now: float
) -> tuple[float, float, bool]:
    """(start, end, live): first job_created/attempt_started → the end event that nothing
    (a resume, a new attempt) followed, else `now`."""
    starts = [e.time for e in events if e.kind == "job_created"]
    starts += [a.started_at for a in attempts]
    start = min(starts) if starts else _first(_num(record.created_at), now)
    restarted = [e.time for e in events if e.kind == "job_resumed"]
    restarted += [a.started_at for a in attempts]
    ends = [e.time for e in events if e.kind in JOB_END_KINDS]
    if ends and ends[-1] >= max(restarted, default=start):
        return start, max(ends[-1], start), False
    if record.state.terminal:
        # Ended, but its end event is missing: the newest evidence of anything is the end.
        known = [e.time for e in events] + [start]
        for attempt in attempts:
            known += [
                t
                for t in (
                    attempt.ended.time if attempt.ended else None,
                    _num(attempt.record_field("ended_at")),
                    _num(attempt.ended_field("decided_at")),
                    _num(attempt.record_field("last_step_at")),
                )
                if t is not None
            ]
        return start, max(known), False
    return start, max(now, start), True


# -- cutting the wall time -------------------------------------------------------------------------
class _Timeline:
    """Cuts `[start, end)` into consecutive segments, left to right.

    `advance(until, ...)` covers the time from the cursor to `until` (clamped into
    `[cursor, end]`, so out-of-order or overlapping evidence never goes backwards or past the
    end). Checkpoint stalls queued with `queue_stalls` are cut out of whatever the next advances
    cover, and a replay budget turns the next productive seconds into replayed ones.
    """

    def __init__(self, start: float, end: float) -> None:
        self.end = end
        self.cursor = start
        self.segments: list[Segment] = []
        self._stalls: list[tuple[float, float, str]] = []
        self._replay_s = 0.0
        self._replay_label = ""

    def _add(self, until: float, category: Category, attempt: int | None, label: str) -> None:
        until = min(max(until, self.cursor), self.end)
        if until <= self.cursor:
            return
        last = self.segments[-1] if self.segments else None
        if last and (last.category, last.attempt, last.label) == (category, attempt, label):
            self.segments[-1] = dataclasses.replace(last, end=until)
        else:
            self.segments.append(Segment(self.cursor, until, category, attempt, label))
        self.cursor = until

    def _fill(self, until: float, category: Category, attempt: int | None, label: str) -> None:
        if category is Category.PRODUCTIVE and self._replay_s > 0:
            before = self.cursor
            replay_end = min(until, before + self._replay_s)
            self._add(replay_end, Category.REPLAYED, attempt, self._replay_label)
            self._replay_s -= self.cursor - before
        self._add(until, category, attempt, label)

    def advance(
        self, until: float | None, category: Category, attempt: int | None, label: str
    ) -> None:
        if until is None:
            return
        while self._stalls and self._stalls[-1][0] < min(until, self.end):
            low, high, stall_label = self._stalls.pop()
            self._fill(low, category, attempt, label)
            self._add(high, Category.CHECKPOINT_STALL, attempt, stall_label)
        self._fill(until, category, attempt, label)

    def queue_stalls(self, stalls: Iterable[tuple[float, float, str]]) -> None:
        """Stall windows (start, end, label) to cut out of the coming advances of an attempt."""
        self._stalls = sorted(stalls, reverse=True)  # the next one last: pop() is cheap

    def clear_stalls(self) -> None:
        """Forget stalls that never fell inside the attempt (reported past its end)."""
        self._stalls = []

    def replay(self, seconds: float, label: str) -> None:
        """Count the next `seconds` of productive time as replayed."""
        self._replay_s, self._replay_label = max(0.0, seconds), label

    def stop_replay(self) -> None:
        self._replay_s = 0.0


def _stall_windows(
    attempt: _Attempt,
) -> tuple[list[tuple[float, float, str]], list[CheckpointMark]]:
    """The attempt's checkpoint stalls as windows (one per step) and their marks."""
    windows: list[tuple[float, float, str]] = []
    marks: list[CheckpointMark] = []
    seen: set[int | None] = set()
    for event in attempt.committed:
        data = _data(event)
        step = _int(data.get("step"))
        if step is not None and step in seen:
            continue  # a duplicated report of the same commit
        seen.add(step)
        stall = max(0.0, _num(data.get("stall_s")) or 0.0)
        marks.append(CheckpointMark(event.time, step, attempt.number, stall))
        if stall <= 0:
            continue
        durable = _num(data.get("durable_s"))
        called = event.time - durable if durable is not None and durable >= stall else None
        low = called if called is not None else event.time - stall
        windows.append((low, low + stall, f"checkpoint stall, step {step}"))
    return windows, marks


def _replay_seconds(
    attempt: _Attempt, high_water: int | None, fallback_mean: float | None
) -> float:
    """Seconds of this attempt's step time spent redoing steps an earlier attempt completed."""
    if high_water is None or attempt.first_step_at is None:
        return 0.0
    last = attempt.last_step
    if last is not None and last <= high_water:
        return math.inf  # it never got past what was already done
    first = attempt.first_step
    done_at_first = first if first is not None else attempt.restored_step
    if done_at_first is None:
        return 0.0
    mean = attempt.mean_step_s or fallback_mean
    return max(0, high_water - done_at_first) * mean if mean else 0.0


def _cut_attempt(tl: _Timeline, attempt: _Attempt, before_first: Category) -> None:
    """Cover one attempt from its start to its decision (or its last sign of life)."""
    number, outcome = attempt.number, attempt.outcome
    pre_label = (
        "launch, rendezvous, first step"
        if before_first is Category.STARTUP
        else "relaunch, rendezvous, first step"
    )
    pre_end: float | None
    if attempt.first_step_at is not None:
        pre_end = attempt.first_step_at
    elif _ended_badly(outcome):
        pre_end = attempt.failed_at
    elif outcome == RUNNING:
        pre_end = tl.end
    elif outcome == SUCCEEDED:
        pre_end = _first(attempt.ended_at, attempt.decided_at)
    else:  # the controller went away: up to its last sign of life
        pre_end = _first(attempt.last_seen, attempt.started_at)
    # The restore ends when it was reported (or at the first step), kept inside the attempt.
    if attempt.restore_s and pre_end is not None:
        restored_at = attempt.restored[-1].time if attempt.restored else pre_end
        restore_end = min(restored_at, pre_end)
        restore_start = max(restore_end - attempt.restore_s, attempt.started_at)
        tl.advance(restore_start, before_first, number, pre_label)
        step = attempt.restored_step
        tl.advance(
            restore_end, Category.RESTORE, number, f"restore step {step}" if step else "restore"
        )
    tl.advance(pre_end, before_first, number, pre_label)
    if attempt.first_step_at is not None:
        tl.advance(attempt.last_step_at, Category.PRODUCTIVE, number, "training")
        tl.stop_replay()
    if outcome == SUCCEEDED:
        tl.advance(_first(attempt.ended_at, attempt.decided_at), Category.WAITING, number, "finish")
    elif _ended_badly(outcome):
        tl.advance(attempt.failed_at, Category.WAITING, number, "lost work after the last step")
        what = attempt.cause or ("stop" if outcome == STOPPED else "failure")
        tl.advance(attempt.decided_at, Category.FAILURE_DETECTION, number, f"detecting {what}")
    elif outcome == RUNNING and attempt.first_step_at is not None:
        tl.advance(tl.end, Category.WAITING, number, "no step reported since")
    tl.clear_stalls()


def _cut_wait(
    tl: _Timeline, until: float, previous: _Attempt, resumes: Sequence[float], ended: bool
) -> None:
    """Cover the cursor → `until` after an attempt: a relaunch, or a wait then a resume.

    Nobody drove the job while its controller was lost (until ``trainctl resume``) or after the
    job ended (until a requeue or resume); a controller that relaunches inside the allocation
    is restarting.
    """
    resumed = [t for t in resumes if tl.cursor <= t <= until]
    lost = previous.outcome in (CONTROLLER_LOST, UNKNOWN)
    if lost or ended or resumed:
        why = "controller lost: waiting for resume" if lost else "job ended: waiting for resume"
        tl.advance(resumed[-1] if resumed else until, Category.WAITING, None, why)
        tl.advance(until, Category.RESTART, None, "resume, relaunch")
    else:
        tl.advance(until, Category.RESTART, None, "relaunch")


def _cut(
    tl: _Timeline,
    attempts: Sequence[_Attempt],
    events: Sequence[Event],
    record: JobRecord,
    live: bool,
) -> list[CheckpointMark]:
    """Cover the whole job, attempt by attempt; returns the committed checkpoints seen."""
    resumes = [e.time for e in events if e.kind == "job_resumed"]
    job_ends = [e.time for e in events if e.kind in JOB_END_KINDS]
    marks: list[CheckpointMark] = []
    high_water: int | None = None
    fallback_mean: float | None = None
    for index, attempt in enumerate(attempts):
        if index == 0:
            tl.advance(attempt.started_at, Category.STARTUP, None, "job created, nodes starting")
        else:
            ended = any(tl.cursor <= t <= attempt.started_at for t in job_ends)
            _cut_wait(tl, attempt.started_at, attempts[index - 1], resumes, ended)
        windows, attempt_marks = _stall_windows(attempt)
        marks += attempt_marks
        tl.queue_stalls(windows)
        replay = _replay_seconds(attempt, high_water, fallback_mean)
        if replay > 0:
            tl.replay(replay, f"replaying steps up to {high_water}")
        _cut_attempt(tl, attempt, Category.STARTUP if index == 0 else Category.RESTART)
        if attempt.last_step is not None:
            high_water = max(high_water or 0, attempt.last_step)
        fallback_mean = attempt.mean_step_s or fallback_mean
    if not attempts:
        pending = record.state is JobState.PENDING
        category = Category.WAITING if pending else Category.STARTUP
        tl.advance(tl.end, category, None, "pending" if pending else "starting")
    elif live:  # between attempts right now: relaunching, or waiting to be resumed
        _cut_wait(tl, tl.end, attempts[-1], resumes, ended=False)
    else:
        tl.advance(tl.end, Category.WAITING, None, "job ending")
    return marks


def _failures(attempts: Sequence[_Attempt]) -> list[Failure]:
    failures = []
    for attempt in attempts:
        if attempt.outcome in (SUCCEEDED, RUNNING):
            continue
        fault = attempt.fault
        node = _first(attempt.blamed, fault.node if fault is not None else None)
        failures.append(
            Failure(
                time=_first(attempt.failed_at, attempt.decided_at, attempt.started_at),
                attempt=attempt.number,
                node=node,
                cause=attempt.cause,
                reason=attempt.reason,
                outcome=attempt.outcome,
                fault=_text(_data(fault).get("fault")) if fault is not None else None,
            )
        )
    return failures


def build_ledger(record: JobRecord, events: Sequence[Event], now: float) -> Ledger:
    """Cut a job's wall time into categories from its state record and its events.

    Pure: `now` is the end of a job that is still running. Tolerates missing events and fields,
    events out of order and overlapping attempts; the segments always tile `[start, end]`.
    """
    timed = ((event, _num(event.time)) for event in events)
    ordered = sorted(
        (dataclasses.replace(event, time=time) for event, time in timed if time is not None),
        key=lambda event: event.time,
    )
    attempts = _collect_attempts(record, ordered)
    _attach_events(attempts, ordered)
    start, end, live = _job_span(record, ordered, attempts, now)
    for index, attempt in enumerate(attempts):
        _resolve(attempt, index == len(attempts) - 1, live)
    timeline = _Timeline(start, end)
    marks = _cut(timeline, attempts, ordered, record, live)
    return Ledger(
        job_id=record.job_id,
        state=record.state.value,
        start=start,
        end=end,
        live=live,
        segments=tuple(timeline.segments),
        attempts=tuple(a.row() for a in attempts),
        failures=tuple(_failures(attempts)),
        checkpoints=tuple(marks),
    )
