"""Pure decisions: what the controller does next, and why.

`observe(view, observations)` folds what just happened into the attempt as the controller sees
it; `decide(now, view)` returns a `Decision`: an action plus a sentence a person can read in
`trainctl status` and the event log, and the node to blame where there is evidence. No clocks,
processes or storage are touched here.

Node faults the view records (for recovery to exclude or replace the blamed node): a node
agent lost, an UNHEALTHY health verdict (before joining or while running) and a hang whose
evidence points at one node.
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


@dataclasses.dataclass(frozen=True)
class NodeUnhealthy:
    """A node's health gate or periodic probe judged it UNHEALTHY: a node fault.

    Before joining (`phase` ``preflight``) the node never started torchrun; its agent exits
    after reporting, so a later `NodeLost` for it is expected and ignored. The verdict and
    its evidence are in the job store (``nodes/<node>.json``); `reason` is the verdict's.
    """

    node: str
    time: float
    phase: str
    reason: str


@dataclasses.dataclass(frozen=True)
class SilentRank:
    """One rank that made no progress within the hang timeout, as the controller saw it."""

    rank: int
    node: str | None
    """None: the rank never reported, so its node is unknown."""
    step: int | None
    """Last step it reported (None: none yet)."""
    silent_s: float
    process_state: str | None = None
    """The worker's /proc state letter from the stack dump (``T``: stopped, ``D``: in
    uninterruptible I/O, ``S``: sleeping, ...); None when unknown."""


@dataclasses.dataclass(frozen=True)
class Hang:
    """No progress within the hang timeout; stacks were dumped before this was observed."""

    time: float
    timeout_s: float
    explanation: str
    """How the timeout was chosen, with its numbers (from `derive_hang_timeout`)."""
    ranks: tuple[SilentRank, ...]


Observation = NodeExit | NodeLost | StopRequested | NodeUnhealthy | Hang


@dataclasses.dataclass(frozen=True)
class AttemptView:
    """What the controller knows about the current attempt."""

    nodes: tuple[str, ...]
    exits: tuple[NodeExit, ...] = ()
    lost: tuple[NodeLost, ...] = ()
    stop: StopRequested | None = None
    unhealthy: tuple[NodeUnhealthy, ...] = ()
    hang: Hang | None = None


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
    unhealthy = list(view.unhealthy)
    hang = view.hang
    for obs in observations:
        if isinstance(obs, NodeExit) and all(e.node != obs.node for e in exits):
            exits.append(obs)
        elif isinstance(obs, NodeLost):
            known = {e.node for e in exits} | {x.node for x in lost} | {u.node for u in unhealthy}
            if obs.node not in known:
                lost.append(obs)
        elif isinstance(obs, StopRequested) and stop is None:
            stop = obs
        elif isinstance(obs, NodeUnhealthy) and all(u.node != obs.node for u in unhealthy):
            unhealthy.append(obs)
        elif isinstance(obs, Hang) and hang is None:
            hang = obs
    return dataclasses.replace(
        view,
        exits=tuple(exits),
        lost=tuple(lost),
        stop=stop,
        unhealthy=tuple(unhealthy),
        hang=hang,
    )


def _rank_list(ranks: Sequence[SilentRank]) -> str:
    return ", ".join(f"{r.rank} ({r.node or 'node unknown'})" for r in ranks)


def localise_hang(hang: Hang) -> tuple[str | None, str]:
    """The node a hang points at, and why (None: not localised to one node).

    In synchronous training one stuck rank stalls every other rank at its next collective,
    so silence alone does not localise. Evidence, strongest first: a worker process stopped
    (state ``T``/``t``) or in uninterruptible sleep (``D``); else ranks behind the others'
    step. Blame only when that evidence points at exactly one node.
    """
    for states, what in (("Tt", "stopped"), ("D", "in uninterruptible sleep")):
        stuck = [r for r in hang.ranks if r.process_state and r.process_state in states]
        nodes = {r.node for r in stuck}
        if stuck and len(nodes) == 1 and None not in nodes:
            letters = "/".join(sorted({str(r.process_state) for r in stuck}))
            ranks = ", ".join(str(r.rank) for r in stuck)
            return stuck[0].node, f"rank {ranks} on {stuck[0].node} is {what} (state {letters})"
    steps = [r.step if r.step is not None else -1 for r in hang.ranks]
    if steps and min(steps) < max(steps):
        behind = [r for r, step in zip(hang.ranks, steps, strict=True) if step == min(steps)]
        nodes = {r.node for r in behind}
        if len(nodes) == 1 and None not in nodes:
            at = "no step" if min(steps) < 0 else f"step {min(steps)}"
            return behind[0].node, (
                f"rank {', '.join(str(r.rank) for r in behind)} on {behind[0].node} stuck at "
                f"{at} while others reached step {max(steps)}"
            )
    return None, "not localised to one node"


def describe_hang(hang: Hang) -> str:
    """The sentence for a hang: silent ranks, how long, the timeout's numbers, the suspect."""
    longest = max((r.silent_s for r in hang.ranks), default=0.0)
    _, where = localise_hang(hang)
    return (
        f"hang: no progress for {longest:.1f} s from rank(s) {_rank_list(hang.ranks)}; "
        f"{hang.explanation}; {where}"
    )


def describe_exit(exit_: NodeExit) -> str:
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
    if view.unhealthy:
        first_bad = min(view.unhealthy, key=lambda u: u.time)
        when = "before joining" if first_bad.phase == "preflight" else "while running"
        return Decision(
            Action.FAIL,
            f"{first_bad.node}: UNHEALTHY {when}: {first_bad.reason}",
            ExitCode.FAILED,
            blamed=first_bad.node,
        )
    if view.hang is not None:
        blamed, _ = localise_hang(view.hang)
        return Decision(Action.FAIL, describe_hang(view.hang), ExitCode.FAILED, blamed=blamed)
    if view.lost:
        first = min(view.lost, key=lambda x: x.time)
        return Decision(
            Action.FAIL, f"{first.node}: node agent lost", ExitCode.FAILED, blamed=first.node
        )
    if failures:
        first_failure = failures[0]
        return Decision(Action.FAIL, describe_exit(first_failure), ExitCode.FAILED)
    if len(view.exits) == len(view.nodes) and all(e.code == 0 for e in view.exits):
        return Decision(Action.SUCCEED, "every node finished", ExitCode.FINISHED)
    return Decision(Action.CONTINUE, "running")
