"""Pure conclusions once an attempt has ended: what its failure says when set beside every
node's end and the failures before it.

`policy.decide` acts on the first failure it sees, at once. When the attempt is over and every
node has reported how it ended, `conclude` looks again:

- **A repeat offender.** A worker crash (killed by a signal: SIGKILL, SIGSEGV, the OOM killer)
  blames nobody the first time: one crash is as likely the job's as the node's. When the same
  node was the *only* node whose workers crashed `repeat.crashes` times within
  `repeat.window_s`, the node is blamed and excluded, with the crashes' evidence.
- **A deterministic error.** A Python exception raised before the attempt's first step, the
  same on every node that reported one (a bad value in ``config:``, a missing module, a script
  that needs CUDA on a CPU node), will be raised again by any relaunch: the job ends at once
  with it (exit 3) instead of spending its crash-loop budget.

`FailureRecord` is what the job remembers of each failure (``state.json``'s ``failures``):
crash-loop detection (`placement.crash_loop_length`) and repeat offenders read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from trainctl.recovery.policy import (
    AttemptView,
    Cause,
    Decision,
    describe_exit,
    error_signature,
    is_communication_error,
)


@dataclasses.dataclass(frozen=True)
class FailureRecord:
    """One failed attempt, as crash-loop and repeat-offender detection remember it."""

    signature: str
    committed_step: int | None
    cause: str = ""
    node: str | None = None
    """The node the failure points at: the blamed one, or a worker crash's only suspect."""
    time: float = 0.0

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FailureRecord:
        """A ``failures`` entry (older stores hold only the signature and step)."""
        step, node, when = data.get("committed_step"), data.get("node"), data.get("time", 0.0)
        return cls(
            str(data.get("signature", "")),
            None if step is None else int(str(step)),
            str(data.get("cause", "")),
            None if node is None else str(node),
            float(when) if isinstance(when, int | float) and not isinstance(when, bool) else 0.0,
        )

    @classmethod
    def of(cls, decision: Decision, committed_step: int | None, now: float) -> FailureRecord:
        return cls(
            decision.signature or decision.reason,
            committed_step,
            decision.cause.value,
            decision.blamed or decision.suspect,
            now,
        )


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
    crashes: int = 2
    window_s: float = 3600.0


def _own_errors(errors: Sequence[str]) -> list[str]:
    return [e for e in errors if e and not is_communication_error(e)]


def deterministic(decision: Decision, view: AttemptView, stepped: bool) -> bool:
    """A software error before the first step, the same on every node that reported an
    exception of its own, with no node crashing otherwise."""
    if decision.cause is not Cause.SOFTWARE_ERROR or stepped:
        return False
    signatures = set()
    for exit_ in view.exits:
        own = _own_errors(exit_.errors)
        if own:
            signatures.add(f"software:{error_signature(own[0])}")
        elif exit_.signalled and not exit_.stopped:
            return False
    return signatures == {decision.signature}


def repeat_offence(
    decision: Decision,
    history: Sequence[FailureRecord],
    now: float,
    repeat: RepeatPolicy,
) -> list[FailureRecord]:
    """The earlier crashes that, with this one, make its suspect a repeat offender (empty:
    not one)."""
    if decision.cause is not Cause.WORKER_CRASH or decision.suspect is None:
        return []
    earlier = [
        f
        for f in history
        if f.cause == Cause.WORKER_CRASH.value
        and f.node == decision.suspect
        and now - f.time <= repeat.window_s
    ]
    return earlier if len(earlier) + 1 >= repeat.crashes else []


def conclude(
    decision: Decision,
    view: AttemptView,
    stepped: bool,
    history: Sequence[FailureRecord],
    now: float,
    repeat: RepeatPolicy,
) -> Decision:
    """The attempt's decision, revised with every node's end (`view`), whether any step was
    done (`stepped`) and the job's earlier failures (`history`, oldest first)."""
    if deterministic(decision, view, stepped):
        return dataclasses.replace(
            decision,
            reason=f"{decision.reason} — raised on every node before the first step: "
            "deterministic, not retried",
            deterministic=True,
        )
    if decision.cause is Cause.WORKER_CRASH:
        # The first exit decided at once, and it is often a peer's broken connection: with
        # every node's end known, the one node whose workers died of a signal is the suspect.
        crashed = [e for e in view.exits if e.signalled]
        alone = crashed[0].node if len({e.node for e in crashed}) == 1 else None
        reason = describe_exit(crashed[0]) if alone else decision.reason
        decision = dataclasses.replace(decision, reason=reason, suspect=alone)
    earlier = repeat_offence(decision, history, now, repeat)
    if earlier:
        node = decision.suspect
        minutes = repeat.window_s / 60
        return dataclasses.replace(
            decision,
            reason=f"{node}: its workers died of a signal {len(earlier) + 1} times within "
            f"{minutes:g} min while the other nodes' stayed up (this time: {decision.reason})",
            blamed=node,
            cause=Cause.NODE_FAULT,
            signature=f"repeat:{node}",
        )
    return decision
