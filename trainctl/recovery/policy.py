"""Pure decisions: what the controller does next, and why.

`decide(now, view, observations)` looks at the attempt as the controller sees it and at what
just happened, and returns a `Decision`: an action plus a sentence a person can read in
`trainctl status` and the event log. No clocks, processes or storage are touched here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from trainctl.exitcodes import ExitCode


class Action(str, enum.Enum):
    CONTINUE = "continue"
    """Nothing to do: the attempt is healthy or still starting."""
    SUCCEED = "succeed"
    """Every node finished cleanly: the job succeeded."""
    FAIL = "fail"
    """The attempt failed and the job ends (retry allowed by the scheduler)."""
    STOP = "stop"
    """A stop was requested (signal): stop every node."""


@dataclasses.dataclass(frozen=True)
class NodeExit:
    node: str
    code: int
    time: float
    stopped: bool = False
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeLost:
    """The node's agent vanished (connection closed or process gone) without reporting an exit."""

    node: str
    time: float


@dataclasses.dataclass(frozen=True)
class StopRequested:
    signal: str
    time: float


Observation = NodeExit | NodeLost | StopRequested


@dataclasses.dataclass(frozen=True)
class AttemptView:
    """What the controller knows about the current attempt."""

    nodes: tuple[str, ...]
    exits: tuple[NodeExit, ...] = ()
    lost: tuple[NodeLost, ...] = ()
    stop: StopRequested | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    exit_code: ExitCode | None = None
    blamed: str | None = None


def observe(view: AttemptView, observations: Sequence[Observation]) -> AttemptView:
    """Fold new observations into the view (pure)."""
    exits = list(view.exits)
    lost = list(view.lost)
    stop = view.stop
    for obs in observations:
        if isinstance(obs, NodeExit) and all(e.node != obs.node for e in exits):
            exits.append(obs)
        elif isinstance(obs, NodeLost):
            if all(e.node != obs.node for e in exits) and all(x.node != obs.node for x in lost):
                lost.append(obs)
        elif isinstance(obs, StopRequested) and stop is None:
            stop = obs
    return dataclasses.replace(view, exits=tuple(exits), lost=tuple(lost), stop=stop)


def _describe_exit(exit_: NodeExit) -> str:
    how = f"signal {-exit_.code}" if exit_.code < 0 else f"exit code {exit_.code}"
    text = f"{exit_.node}: torchrun ended with {how}"
    if exit_.errors:
        text += f" ({exit_.errors[0]})"
    return text


def decide(now: float, view: AttemptView) -> Decision:
    """The next action for an attempt, with its reason."""
    if view.stop is not None:
        return Decision(
            Action.STOP,
            f"stop requested ({view.stop.signal})",
            ExitCode.PREEMPTED if view.stop.signal in ("SIGTERM", "SIGUSR1") else ExitCode.FAILED,
        )
    failures = sorted(
        [e for e in view.exits if e.code != 0 and not e.stopped], key=lambda e: e.time
    )
    if view.lost:
        first = min(view.lost, key=lambda x: x.time)
        return Decision(
            Action.FAIL, f"{first.node}: node agent lost", ExitCode.FAILED, blamed=first.node
        )
    if failures:
        first_failure = failures[0]
        return Decision(Action.FAIL, _describe_exit(first_failure), ExitCode.FAILED)
    if len(view.exits) == len(view.nodes) and all(e.code == 0 for e in view.exits):
        return Decision(Action.SUCCEED, "every node finished", ExitCode.FINISHED)
    return Decision(Action.CONTINUE, "running")
