"""What is known about each attempt of a job, merged from ``state.json`` and the events.

`collect_attempts` keys the attempts by number (events win over the state record, which may be
older or newer than the events), `attach_events` gives each its first step, restores, commits
and injected faults, and `resolve` picks each time and the outcome from the best evidence
available. `job_span` finds where the job's wall time starts and ends. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

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
)
from trainctl.report.ledger import (
    CONTROLLER_LOST,
    FAILED,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    UNKNOWN,
    AttemptRow,
)
from trainctl.state import AttemptRecord, AttemptState, JobRecord


def first_known(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


# -- one attempt, merged from state.json and the events -----------------------------------------
@dataclasses.dataclass
class AttemptEvidence:
    """Everything known about one attempt number; events win over the state record."""

    number: int
    record: AttemptRecord | None = None
    started: Event[AttemptStarted] | None = None
    ended: Event[AttemptEnded] | None = None
    first: Event[FirstStep] | None = None
    restored: list[Event[CheckpointRestored]] = dataclasses.field(default_factory=list)
    committed: list[Event[CheckpointCommitted]] = dataclasses.field(default_factory=list)
    faults: list[Event[FaultInjected]] = dataclasses.field(default_factory=list)
    last_seen: float | None = None
    """Time of the newest event the attempt's own controller wrote (liveness evidence)."""
    started_at: float = 0.0
    """Set by `collect_attempts`."""

    # Resolved by `resolve`:
    first_step_at: float | None = None
    last_step_at: float | None = None
    failed_at: float | None = None
    decided_at: float | None = None
    ended_at: float | None = None
    outcome: str = UNKNOWN
    restore_s: float | None = None
    mean_step_s: float | None = None

    @property
    def end(self) -> AttemptEnded | None:
        return self.ended.data if self.ended is not None else None

    @property
    def first_step(self) -> int | None:
        from_event = self.first.data.step if self.first is not None else None
        return first_known(
            from_event,
            self.end.first_step if self.end else None,
            self.record.first_step if self.record else None,
        )

    @property
    def last_step(self) -> int | None:
        return first_known(
            self.end.last_step if self.end else None,
            self.record.last_step if self.record else None,
        )

    @property
    def restored_step(self) -> int | None:
        """The checkpoint step this attempt restored; None when it restored none."""
        step = first_known(
            *(e.data.step for e in self.restored),
            self.first.data.restored_step if self.first is not None else None,
            self.end.restored_step if self.end else None,
            self.record.restored_step if self.record else None,
        )
        return step or None  # 0 means "none" in `first_step`

    @property
    def restore_tier(self) -> str | None:
        """Where the restored step was read from (``memory`` or ``durable``); None: unknown."""
        return first_known(*(e.data.tier for e in reversed(self.restored)))

    @property
    def cause(self) -> str | None:
        return first_known(
            (self.end.cause or None) if self.end else None,
            (self.record.cause or None) if self.record else None,
        )

    @property
    def blamed(self) -> str | None:
        return first_known(
            (self.end.blamed or None) if self.end else None,
            (self.record.blamed or None) if self.record else None,
        )

    @property
    def reason(self) -> str:
        return (
            first_known(
                (self.end.reason or None) if self.end else None,
                (self.record.reason or None) if self.record else None,
            )
            or ""
        )

    @property
    def nodes(self) -> tuple[str, ...]:
        if self.started is not None:
            return tuple(self.started.data.nodes)
        return tuple(self.record.nodes) if self.record else ()

    @property
    def world_size(self) -> int | None:
        from_event = self.started.data.world_size if self.started else None
        return first_known(from_event, (self.record.world_size or None) if self.record else None)

    @property
    def fault(self) -> Event[FaultInjected] | None:
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
            restore_tier=self.restore_tier,
        )


def ended_badly(outcome: str) -> bool:
    """An attempt its controller ended without success (failed, stopped, or an outcome this
    version does not know yet): its failure was detected and decided on."""
    return outcome not in (SUCCEEDED, CONTROLLER_LOST, RUNNING, UNKNOWN)


_OUTCOME_OF_STATE = {
    AttemptState.SUCCEEDED: SUCCEEDED,
    AttemptState.FAILED: FAILED,
    AttemptState.STOPPED: STOPPED,
}


def collect_attempts(record: JobRecord, events: Sequence[Event]) -> list[AttemptEvidence]:
    """Merge state.json's attempts with the attempt events, ordered by start time.

    Attempts are keyed by number: duplicated events for one number collapse (earliest start,
    latest end). An attempt with no start time anywhere borrows its earliest known time; one
    with no time at all is dropped.
    """
    attempts: dict[int, AttemptEvidence] = {}
    for attempt_record in record.attempts:
        attempts[attempt_record.number] = AttemptEvidence(
            attempt_record.number, record=attempt_record
        )
    for event in events:
        number = event.attempt
        started, ended = event.of(AttemptStarted), event.of(AttemptEnded)
        if started is not None:
            number = number if number is not None else max(attempts, default=0) + 1
            attempt = attempts.setdefault(number, AttemptEvidence(number))
            if attempt.started is None:
                attempt.started = started
        elif ended is not None and number is not None:
            attempts.setdefault(number, AttemptEvidence(number)).ended = ended
    kept = []
    for attempt in attempts.values():
        start = first_known(
            attempt.started.time if attempt.started else None,
            attempt.record.started_at if attempt.record else None,
        )
        end = attempt.end
        if start is None:
            later = (
                [end.first_step_at, end.last_step_at, end.failed_at, end.decided_at] if end else []
            )
            later.append(attempt.ended.time if attempt.ended else None)
            start = min((t for t in later if t is not None), default=None)
        if start is not None:
            attempt.started_at = start
            kept.append(attempt)
    return sorted(kept, key=lambda a: (a.started_at, a.number))


def _owner(attempts: Sequence[AttemptEvidence], event: Event) -> AttemptEvidence | None:
    """The attempt an event belongs to: by its number, else by time (the latest one started)."""
    number = event.attempt
    if number is not None:
        return next((a for a in attempts if a.number == number), None)
    started = [a for a in attempts if a.started_at <= event.time]
    return started[-1] if started else None


def attach_events(attempts: Sequence[AttemptEvidence], events: Sequence[Event]) -> None:
    for event in events:
        owner = _owner(attempts, event)
        if owner is None:
            continue
        first, restored = event.of(FirstStep), event.of(CheckpointRestored)
        committed, fault = event.of(CheckpointCommitted), event.of(FaultInjected)
        if first is not None and owner.first is None:
            owner.first = first
        elif restored is not None:
            owner.restored.append(restored)
        elif committed is not None:
            owner.committed.append(committed)
        elif fault is not None:
            owner.faults.append(fault)
        if event is not owner.ended and event.kind not in JOB_END_KINDS | {JobResumed.KIND}:
            owner.last_seen = max(owner.last_seen or event.time, event.time)


def _mean_step_s(attempt: AttemptEvidence) -> float | None:
    first, last = attempt.first_step, attempt.last_step
    if None in (first, last, attempt.first_step_at, attempt.last_step_at):
        return None
    assert first is not None and last is not None
    assert attempt.first_step_at is not None and attempt.last_step_at is not None
    steps, seconds = last - first, attempt.last_step_at - attempt.first_step_at
    return seconds / steps if steps > 0 and seconds > 0 else None


def resolve(attempt: AttemptEvidence, is_last: bool, job_live: bool) -> None:
    """Pick each time and the outcome from the best evidence available."""
    end, record = attempt.end, attempt.record
    first_event_at = attempt.first.time if attempt.first is not None else None
    attempt.first_step_at = first_known(
        first_event_at,
        end.first_step_at if end else None,
        record.first_step_at if record else None,
    )
    attempt.last_step_at = first_known(
        end.last_step_at if end else None, record.last_step_at if record else None
    )
    if attempt.first_step_at is not None and attempt.last_step_at is not None:
        attempt.last_step_at = max(attempt.last_step_at, attempt.first_step_at)
    elif attempt.first_step_at is not None:
        attempt.last_step_at = attempt.first_step_at
    ended_at = attempt.ended.time if attempt.ended is not None else None
    attempt.ended_at = first_known(ended_at, record.ended_at if record else None)
    attempt.decided_at = first_known(end.decided_at if end else None, attempt.ended_at)

    outcome = (end.outcome or None) if end else None
    if outcome is None and attempt.record is not None:
        outcome = _OUTCOME_OF_STATE.get(attempt.record.state)
        if outcome is not None and attempt.record.cause == CONTROLLER_LOST:
            outcome = CONTROLLER_LOST
    if outcome is None:
        outcome = RUNNING if is_last and job_live and attempt.ended is None else UNKNOWN
    attempt.outcome = outcome

    if ended_badly(outcome):
        # The spec'd order of evidence: an injected fault, else the last progress before the
        # failure; the controller's own `failed_at` (often when it *observed* the failure, e.g.
        # a hang's detection) only when the attempt never reported a step.
        fault_at = attempt.fault.time if attempt.fault is not None else None
        attempt.failed_at = first_known(
            fault_at,
            attempt.last_step_at,
            end.failed_at if end else None,
            attempt.decided_at,
        )
    elif outcome in (CONTROLLER_LOST, UNKNOWN):
        attempt.failed_at = first_known(attempt.last_step_at, attempt.last_seen, attempt.started_at)
    restores = [e.data.restore_s for e in attempt.restored]
    attempt.restore_s = max((r for r in restores if r is not None and r > 0), default=None)
    attempt.mean_step_s = _mean_step_s(attempt)


# -- the job's span --------------------------------------------------------------------------------
def job_span(
    record: JobRecord, events: Sequence[Event], attempts: Sequence[AttemptEvidence], now: float
) -> tuple[float, float, bool]:
    """(start, end, live): first job_created/attempt_started → the end event that nothing
    (a resume, a new attempt) followed, else `now`."""
    starts = [e.time for e in events if isinstance(e.data, JobCreated)]
    starts += [a.started_at for a in attempts]
    start = min(starts) if starts else first_known(record.created_at, now)
    restarted = [e.time for e in events if isinstance(e.data, JobResumed)]
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
                    attempt.record.ended_at if attempt.record else None,
                    attempt.end.decided_at if attempt.end else None,
                    attempt.record.last_step_at if attempt.record else None,
                )
                if t is not None
            ]
        return start, max(known), False
    return start, max(now, start), True
