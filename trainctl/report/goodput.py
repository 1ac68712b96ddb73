"""The goodput ledger: where every second of a job's wall-clock time went.

`build_ledger(record, events, now)` is pure (no clock, no I/O): it reads the job's state record
and its event log and cuts the job's wall time — from its first ``job_created`` or
``attempt_started`` event to its end event (or `now` while it runs) — into consecutive
`Segment`s, each of exactly one `Category`. The categories therefore sum to the wall time by
construction, whatever the input: missing events, a controller that died mid-attempt, attempts
whose times overlap. ``goodput = productive / wall``.

How one attempt is cut (times are the best evidence available; see `resolve`)::

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
import math
from collections.abc import Iterable, Sequence

from trainctl.events import (
    JOB_END_KINDS,
    AttemptEnded,
    AttemptStarted,
    CheckpointCommitted,
    CheckpointRestored,
    Event,
    FaultInjected,
    FirstStep,
    JobCreated,
    JobResumed,
    NodeExcluded,
)
from trainctl.report.attempts import (
    AttemptEvidence,
    attach_events,
    collect_attempts,
    ended_badly,
    first_known,
    job_span,
    resolve,
)
from trainctl.report.ledger import (
    CONTROLLER_LOST,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    UNKNOWN,
    Category,
    CheckpointMark,
    Exclusion,
    Failure,
    Ledger,
    Segment,
)
from trainctl.state import JobRecord, JobState

LEDGER_KINDS: frozenset[str] = JOB_END_KINDS | {
    kind.KIND
    for kind in (
        AttemptEnded,
        AttemptStarted,
        CheckpointCommitted,
        CheckpointRestored,
        FaultInjected,
        FirstStep,
        JobCreated,
        JobResumed,
        NodeExcluded,
    )
}
"""The event kinds whose data the ledger reads; of every other event it needs only the
envelope (time, kind, attempt: an attempt's last sign of life), so a reader may skip
validating their data (`trainctl.event_reader.read_all`)."""


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
    attempt: AttemptEvidence,
) -> tuple[list[tuple[float, float, str]], list[CheckpointMark]]:
    """The attempt's checkpoint stalls as windows (one per step) and their marks."""
    windows: list[tuple[float, float, str]] = []
    marks: list[CheckpointMark] = []
    seen: set[int | None] = set()
    for event in attempt.committed:
        data = event.data
        step = data.step
        if step is not None and step in seen:
            continue  # a duplicated report of the same commit
        seen.add(step)
        stall = max(0.0, data.stall_s)
        marks.append(CheckpointMark(event.time, step, attempt.number, stall))
        if stall <= 0:
            continue
        durable = data.durable_s
        called = event.time - durable if durable is not None and durable >= stall else None
        low = called if called is not None else event.time - stall
        windows.append((low, low + stall, f"checkpoint stall, step {step}"))
    return windows, marks


def _replay_seconds(
    attempt: AttemptEvidence, high_water: int | None, fallback_mean: float | None
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


def _cut_attempt(tl: _Timeline, attempt: AttemptEvidence, before_first: Category) -> None:
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
    elif ended_badly(outcome):
        pre_end = attempt.failed_at
    elif outcome == RUNNING:
        pre_end = tl.end
    elif outcome == SUCCEEDED:
        pre_end = first_known(attempt.ended_at, attempt.decided_at)
    else:  # the controller went away: up to its last sign of life
        pre_end = first_known(attempt.last_seen, attempt.started_at)
    # The restore ends when it was reported (or at the first step), kept inside the attempt.
    if attempt.restore_s and pre_end is not None:
        restored_at = attempt.restored[-1].time if attempt.restored else pre_end
        restore_end = min(restored_at, pre_end)
        restore_start = max(restore_end - attempt.restore_s, attempt.started_at)
        tl.advance(restore_start, before_first, number, pre_label)
        step = attempt.restored_step
        label = f"restore step {step}" if step else "restore"
        if attempt.restore_tier:
            label += f" from {attempt.restore_tier}"
        tl.advance(restore_end, Category.RESTORE, number, label)
    tl.advance(pre_end, before_first, number, pre_label)
    if attempt.first_step_at is not None:
        tl.advance(attempt.last_step_at, Category.PRODUCTIVE, number, "training")
        tl.stop_replay()
    if outcome == SUCCEEDED:
        tl.advance(
            first_known(attempt.ended_at, attempt.decided_at), Category.WAITING, number, "finish"
        )
    elif ended_badly(outcome):
        tl.advance(attempt.failed_at, Category.WAITING, number, "lost work after the last step")
        what = attempt.cause or ("stop" if outcome == STOPPED else "failure")
        tl.advance(attempt.decided_at, Category.FAILURE_DETECTION, number, f"detecting {what}")
    elif outcome == RUNNING and attempt.first_step_at is not None:
        tl.advance(tl.end, Category.WAITING, number, "no step reported since")
    tl.clear_stalls()


def _cut_wait(
    tl: _Timeline, until: float, previous: AttemptEvidence, resumes: Sequence[float], ended: bool
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
    attempts: Sequence[AttemptEvidence],
    events: Sequence[Event],
    record: JobRecord,
    live: bool,
) -> list[CheckpointMark]:
    """Cover the whole job, attempt by attempt; returns the committed checkpoints seen."""
    resumes = [e.time for e in events if isinstance(e.data, JobResumed)]
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


def _failures(attempts: Sequence[AttemptEvidence]) -> list[Failure]:
    failures = []
    for attempt in attempts:
        if attempt.outcome in (SUCCEEDED, RUNNING):
            continue
        fault = attempt.fault
        node = first_known(attempt.blamed, fault.node if fault is not None else None)
        failures.append(
            Failure(
                time=first_known(attempt.failed_at, attempt.decided_at, attempt.started_at),
                attempt=attempt.number,
                node=node,
                cause=attempt.cause,
                reason=attempt.reason,
                outcome=attempt.outcome,
                fault=fault.data.fault if fault is not None else None,
            )
        )
    return failures


def build_ledger(record: JobRecord, events: Sequence[Event], now: float) -> Ledger:
    """Cut a job's wall time into categories from its state record and its events.

    Pure: `now` is the end of a job that is still running. The events are typed (a bad one
    was skipped when read); tolerates missing events and fields, events out of order and
    overlapping attempts; the segments always tile `[start, end]`.
    """
    ordered = sorted(events, key=lambda event: event.time)
    attempts = collect_attempts(record, ordered)
    attach_events(attempts, ordered)
    start, end, live = job_span(record, ordered, attempts, now)
    for index, attempt in enumerate(attempts):
        resolve(attempt, index == len(attempts) - 1, live)
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
        exclusions=tuple(
            Exclusion(e.time, e.node, e.attempt, excluded.data.reason)
            for e in ordered
            if (excluded := e.of(NodeExcluded)) is not None
        ),
    )
