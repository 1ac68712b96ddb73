"""Which checkpoint steps to delete, and why (pure: a decision from its inputs).

Rules, in order of precedence:

1. The newest committed step is never deleted (it is what a restart restores).
2. Steps in `protected` (being restored right now) are never deleted.
3. The newest `keep_last` committed steps are kept (`keep_last` >= 2: the newest may be the one
   a crash interrupts while it is read, so one older complete step must always remain).
4. Committed steps that are multiples of `keep_every` are kept (long-horizon history).
5. Other committed steps are deleted.
6. An uncommitted step (no manifest) older than the newest committed step is the leftover of a
   save that crashed: delete it. One newer than every committed step may be a save in progress
   (this process's or another rank's): keep it.

Multipart uploads still open under a step follow the same rule as an uncommitted step (see
`upload_is_orphaned`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_KEEP_LAST = 2


@dataclass(frozen=True)
class StepDecision:
    """What to do with one step and the sentence that explains it."""

    step: int
    committed: bool
    delete: bool
    reason: str


@dataclass(frozen=True)
class RetentionPolicy:
    """How many committed steps to keep."""

    keep_last: int = 3
    """Keep this many of the newest committed steps (>= 2)."""
    keep_every: int | None = None
    """Also keep every committed step that is a multiple of this (None or 0: off)."""

    def __post_init__(self) -> None:
        if self.keep_last < MIN_KEEP_LAST:
            raise ValueError(
                f"keep_last must be >= {MIN_KEEP_LAST} (the newest checkpoint may be unreadable "
                f"if a crash hits while it is restored), got {self.keep_last}"
            )
        if self.keep_every is not None and self.keep_every < 0:
            raise ValueError(f"keep_every must be >= 0 or None, got {self.keep_every}")


def decide_retention(
    committed: Iterable[int],
    uncommitted: Iterable[int],
    policy: RetentionPolicy,
    protected: Iterable[int] = (),
) -> list[StepDecision]:
    """Decide, for every step given, whether to delete it, with a reason.

    Args:
        committed: steps with a manifest.
        uncommitted: steps with objects but no manifest.
        policy: the retention policy.
        protected: steps that must survive whatever the policy says (being restored).

    Returns one decision per step, newest first. A step listed in both `committed` and
    `uncommitted` counts as committed.
    """
    committed_steps = sorted(set(committed), reverse=True)
    committed_set = set(committed_steps)
    uncommitted_steps = sorted(set(uncommitted) - committed_set, reverse=True)
    protected_set = set(protected)
    newest = committed_steps[0] if committed_steps else None
    newest_kept = set(committed_steps[: policy.keep_last])

    decisions = []
    for step in committed_steps:
        decisions.append(_decide_committed(step, newest, newest_kept, protected_set, policy))
    for step in uncommitted_steps:
        decisions.append(_decide_uncommitted(step, newest, protected_set))
    return sorted(decisions, key=lambda decision: decision.step, reverse=True)


def _decide_committed(
    step: int,
    newest: int | None,
    newest_kept: set[int],
    protected: set[int],
    policy: RetentionPolicy,
) -> StepDecision:
    if step == newest:
        return StepDecision(step, True, False, "newest committed step")
    if step in protected:
        return StepDecision(step, True, False, "being restored")
    if step in newest_kept:
        return StepDecision(step, True, False, f"among the newest {policy.keep_last} committed")
    if policy.keep_every and step % policy.keep_every == 0:
        return StepDecision(step, True, False, f"multiple of keep_every={policy.keep_every}")
    return StepDecision(
        step, True, True, f"older than the newest {policy.keep_last} committed steps"
    )


def _decide_uncommitted(step: int, newest: int | None, protected: set[int]) -> StepDecision:
    if step in protected:
        return StepDecision(step, False, False, "being restored")
    if newest is not None and step < newest:
        return StepDecision(
            step, False, True, f"uncommitted leftover of a failed save (older than step {newest})"
        )
    return StepDecision(
        step, False, False, "uncommitted and newer than every committed step: may be in progress"
    )


def upload_is_orphaned(step: int | None, newest_committed: int | None) -> bool:
    """Whether an open multipart upload under `step` can be aborted.

    Uploads of a step at or below the newest committed step belong to no save in progress
    (a committed step's uploads all completed before its manifest was written). Uploads outside
    any step directory, or newer than every committed step, may still be running: keep them.
    """
    return step is not None and newest_committed is not None and step <= newest_committed
