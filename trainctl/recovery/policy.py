"""Pure decisions during an attempt: what the controller does next, and why.

`observe(view, observations)` folds what just happened into the attempt as the controller sees
it; `decide(now, view)` returns a `Decision`: an action plus a sentence a person can read in
`trainctl status` and the event log, and the node to blame where there is evidence. No clocks,
processes or storage are touched here.

Node faults the view records (for recovery to exclude or replace the blamed node): a node
agent lost, an UNHEALTHY health verdict (before joining or while running) and a hang whose
evidence points at one node. Software errors (a Python exception that is not a lost
connection) never blame a node.

What happens after a failed attempt, and which nodes run (exclusions, spares, readmission,
requeue) is decided in the sibling pure module `trainctl.recovery.placement`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

from trainctl.exitcodes import ExitCode
from trainctl.recovery.hangs import Hang, SilentRank, describe_hang, localise_hang
from trainctl.state import NodeState

__all__ = ["Hang", "SilentRank", "describe_hang", "localise_hang"]  # the hang's own module


class Action(str, enum.Enum):
    CONTINUE = "continue"
    """Nothing to do: the attempt is healthy or still starting."""
    SUCCEED = "succeed"
    """Every node finished cleanly: the job succeeded."""
    FAIL = "fail"
    """The attempt failed and the job ends (retry allowed by the scheduler)."""
    STOP = "stop"
    """A stop was requested (signal): stop every node."""
    ABANDON = "abandon"
    """Another controller owns the job now (this one lost its lease): kill the attempt and
    record nothing."""


@dataclasses.dataclass(frozen=True)
class NodeExit:
    node: str
    code: int
    time: float
    stopped: bool = False
    """The agent stopped the attempt's torchrun: asked to by the controller, or on its own (it
    lost the controller, or was told to end by a signal) — then the node left the job."""
    errors: tuple[str, ...] = ()
    reason: str = ""
    """Why the agent stopped it (`stopped` only)."""
    crashes: tuple[str, ...] = ()
    """How its workers died, where known: signals, the kernel's OOM-killer lines."""

    @property
    def signalled(self) -> bool:
        """A worker (or torchrun) of this node was killed by a signal before any stop: a crash
        of its own (what a stop kills is not; the agent leaves it out of `crashes`)."""
        own = any("killed by" in c or c.startswith("kernel:") for c in self.crashes)
        return own or (self.code < 0 and not self.stopped)


@dataclasses.dataclass(frozen=True)
class NodeLost:
    """The node's agent vanished without reporting an exit: its connection closed, its
    process ended, or its heartbeats stopped (a dead or partitioned host sends no FIN)."""

    node: str
    time: float
    """When it was lost: for a silent node, when it was last heard."""
    reason: str = "node agent lost"


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
class Abandoned:
    """This controller lost the job's lease: another controller runs the job."""

    time: float


Observation = NodeExit | NodeLost | StopRequested | NodeUnhealthy | Hang | Abandoned


def failed(seen: Observation) -> bool:
    """Whether an observation says a node failed (lost, unhealthy, its torchrun failed)."""
    if isinstance(seen, NodeExit):
        return seen.code != 0 and not seen.stopped
    return isinstance(seen, NodeLost | NodeUnhealthy)


@dataclasses.dataclass(frozen=True)
class AttemptView:
    """What the controller knows about the current attempt."""

    nodes: tuple[str, ...]
    exits: tuple[NodeExit, ...] = ()
    lost: tuple[NodeLost, ...] = ()
    stop: StopRequested | None = None
    unhealthy: tuple[NodeUnhealthy, ...] = ()
    hang: Hang | None = None
    abandoned: Abandoned | None = None


class Cause(str, enum.Enum):
    NODE_FAULT = "node_fault"
    """The node is bad: its agent vanished, a health verdict said UNHEALTHY, or a hang was
    localised to it. The node is blamed and excluded."""
    WORKER_CRASH = "worker_crash"
    """A worker died without a Python exception of its own (killed by a signal, OOM killer):
    relaunched in place; repeated, it becomes a crash loop."""
    SOFTWARE_ERROR = "software_error"
    """A Python exception in the training script: never the node's fault."""
    HANG = "hang"
    """No progress, not localised to one node."""
    STORAGE = "storage"
    """The job or checkpoint storage failed."""
    PREEMPTION = "preemption"
    """SIGTERM/SIGUSR1: the scheduler wants the allocation back."""
    STOP = "stop"
    """Stopped by a person (Ctrl-C)."""
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    exit_code: ExitCode | None = None
    blamed: str | None = None
    cause: Cause = Cause.NONE
    signature: str = ""
    """What makes two failures 'the same' for crash-loop detection (cause, node, error)."""
    suspect: str | None = None
    """A worker crash: the one node whose workers died of a signal (evidence, not yet blame:
    `trainctl.recovery.blame` blames a repeat offender)."""
    deterministic: bool = False
    """A software error that will happen again on any node (`blame.conclude`): not retried."""
    lost_with: tuple[str, ...] = ()
    """Other nodes lost in the same incident as `blamed` (a rack, a switch: `lost_together`),
    excluded with it so that one failure costs one relaunch, not one per node."""


CORRELATED_LOSS_S = 1.0
"""Nodes lost within this of the blamed node's loss fell in the same incident."""


def lost_together(decision: Decision, view: AttemptView) -> tuple[str, ...]:
    """The nodes lost within `CORRELATED_LOSS_S` of the blamed node's loss (a rack losing
    power, a switch): blamed with it. Their losses may reach the controller after its decision
    (while it stops the attempt); nodes it kills itself because they did not answer the stop
    are lost `attempt.KILL_WAIT_S` after the decision, past the window (pure)."""
    first = next((x for x in view.lost if x.node == decision.blamed), None)
    if first is None or decision.cause is not Cause.NODE_FAULT:
        return ()
    return tuple(
        sorted(
            {
                x.node
                for x in view.lost
                if x.node != first.node and abs(x.time - first.time) <= CORRELATED_LOSS_S
            }
        )
    )


def observe(view: AttemptView, observations: Sequence[Observation]) -> AttemptView:
    """Fold new observations into the view (pure)."""
    exits = list(view.exits)
    lost = list(view.lost)
    stop = view.stop
    unhealthy = list(view.unhealthy)
    hang = view.hang
    abandoned = view.abandoned
    for obs in observations:
        if getattr(obs, "node", None) not in (None, *view.nodes):
            continue  # a node of an earlier attempt (its connection closing late)
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
        elif isinstance(obs, Abandoned) and abandoned is None:
            abandoned = obs
    return dataclasses.replace(
        view,
        exits=tuple(exits),
        lost=tuple(lost),
        stop=stop,
        unhealthy=tuple(unhealthy),
        hang=hang,
        abandoned=abandoned,
    )


def describe_exit(exit_: NodeExit) -> str:
    how = f"signal {-exit_.code}" if exit_.code < 0 else f"exit code {exit_.code}"
    text = f"{exit_.node}: torchrun ended with {how}"
    if exit_.errors:
        text += f" ({exit_.errors[0]})"
    elif exit_.crashes:
        text += f" ({'; '.join(exit_.crashes)})"
    return text


COMMUNICATION_ERRORS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "gloo",
    "nccl",
    "timed out",
    "timeout",
    "socket",
    "tcpstore",
    "distnetworkerror",
    "disterror",
)
"""Error messages a worker raises when a *peer* died: evidence against the peer, not itself."""


STORAGE_ERRORS = ("storageerror", "restoreerror", "corruptobjecterror", "nosuchbucket")
"""Errors of the job or checkpoint storage (trainctl's own types, S3's): not a bug in the
script, not a node's fault; retried within `recovery.restarts_per_cause.storage`."""


def is_storage_error(message: str) -> bool:
    text = message.lower()
    return any(marker in text for marker in STORAGE_ERRORS)


def is_communication_error(message: str) -> bool:
    text = message.lower()
    return any(marker in text for marker in COMMUNICATION_ERRORS)


def error_signature(message: str) -> str:
    """The first line of an error, with numbers blanked (steps, ports, pids differ per run)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    return re.sub(r"[0-9]+", "N", first)[:200]


def classify_exits(failures: Sequence[NodeExit]) -> Decision:
    """Failed torchruns (earliest first) -> a software error or a worker crash.

    The earliest failure that carries evidence decides: a torchrun killed by a signal is a
    worker crash on that node; a Python exception that is not a lost connection is the
    script's own error — a software error, never blamed on a node. Failures with only broken
    connections are the peers' view of someone else's death: if nothing else is known, a worker
    crash on the first node that failed without an error of its own. A node is blamed for
    crashes only through health evidence; repeated crashes become a crash loop.
    """
    crashed = {e.node for e in failures if e.signalled}
    alone = next(iter(crashed)) if len(crashed) == 1 else None
    for exit_ in failures:
        if exit_.code < 0:
            return Decision(
                Action.FAIL,
                describe_exit(exit_),
                ExitCode.FAILED,
                cause=Cause.WORKER_CRASH,
                signature=f"crash:{exit_.code}",
                suspect=alone,
            )
        storage = [e for e in exit_.errors if e and is_storage_error(e)]
        own = [e for e in exit_.errors if e and not is_communication_error(e)]
        if storage:
            return Decision(
                Action.FAIL,
                describe_exit(dataclasses.replace(exit_, errors=(storage[0],))),
                ExitCode.FAILED,
                cause=Cause.STORAGE,
                signature=f"storage:{error_signature(storage[0])}",
            )
        if own:
            return Decision(
                Action.FAIL,
                describe_exit(dataclasses.replace(exit_, errors=(own[0],))),
                ExitCode.FAILED,
                cause=Cause.SOFTWARE_ERROR,
                signature=f"software:{error_signature(own[0])}",
            )
    silent = [e for e in failures if not e.errors]
    first = next((e for e in failures if e.node == alone), silent[0] if silent else failures[0])
    # The signature leaves the node out: which node reports first is a race when every node
    # fails alike, and a crash loop is the same crash wherever it lands.
    return Decision(
        Action.FAIL,
        describe_exit(first),
        ExitCode.FAILED,
        cause=Cause.WORKER_CRASH,
        signature=f"crash:{first.code}",
        suspect=alone,
    )


def node_outcome(node: str, view: AttemptView, decision: Decision) -> tuple[NodeState, str]:
    """How a node of an attempt ended, once the attempt's `decision` was carried out."""
    if decision.action == Action.SUCCEED:
        return NodeState.SUCCEEDED, ""
    if decision.action in (Action.STOP, Action.ABANDON):
        return NodeState.STOPPED, decision.reason
    if node == decision.blamed:
        return NodeState.FAILED, decision.reason
    exit_ = next((e for e in view.exits if e.node == node), None)
    if exit_ is not None and exit_.code != 0 and not exit_.stopped:
        return NodeState.FAILED, describe_exit(exit_)
    lost = next((x for x in view.lost if x.node == node), None)
    if lost is not None:
        return NodeState.FAILED, f"{node}: {lost.reason}"
    return NodeState.STOPPED, "stopped after another node failed"


def decide(now: float, view: AttemptView) -> Decision:
    """The next action for an attempt, with its reason."""
    if view.abandoned is not None:
        return Decision(
            Action.ABANDON,
            "another controller took the job's lease: this one stops",
            ExitCode.FAILED,
            cause=Cause.STOP,
        )
    if view.stop is not None:
        preempted = view.stop.signal in ("SIGTERM", "SIGUSR1")
        if view.stop.signal == "cancel":
            return Decision(Action.STOP, "cancel requested", ExitCode.CANCELLED, cause=Cause.STOP)
        return Decision(
            Action.STOP,
            f"stop requested ({view.stop.signal})",
            ExitCode.PREEMPTED if preempted else ExitCode.FAILED,
            cause=Cause.PREEMPTION if preempted else Cause.STOP,
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
            cause=Cause.NODE_FAULT,
            signature=f"unhealthy:{first_bad.node}:{first_bad.reason}",
        )
    if view.hang is not None:
        blamed, _ = localise_hang(view.hang)
        return Decision(
            Action.FAIL,
            describe_hang(view.hang),
            ExitCode.FAILED,
            blamed=blamed,
            cause=Cause.NODE_FAULT if blamed else Cause.HANG,
            signature=f"hang:{blamed}",
        )
    # While the attempt runs the controller asks no agent to stop: one that stopped its
    # torchrun on its own (it lost the controller, a signal told it to end) left the job.
    gone = [*view.lost] + [
        NodeLost(e.node, e.time, f"its agent stopped the node ({e.reason or 'no reason given'})")
        for e in view.exits
        if e.stopped
    ]
    if gone:
        first = min(gone, key=lambda x: x.time)
        if len(view.nodes) > 1 and {x.node for x in gone} == set(view.nodes):
            # Every node at once is the controller's side (its host stalled, its network
            # cut), not a node: their agents tore themselves down, as they must.
            return Decision(
                Action.FAIL,
                f"every node was lost at once ({first.node}: {first.reason}): the "
                "controller's host or its network, not a node; none blamed",
                ExitCode.FAILED,
                cause=Cause.NODE_FAULT,
                signature="lost:every node",
            )
        return Decision(
            Action.FAIL,
            f"{first.node}: {first.reason}",
            ExitCode.FAILED,
            blamed=first.node,
            cause=Cause.NODE_FAULT,
            signature=f"lost:{first.node}",
        )
    if failures:
        return classify_exits(failures)
    if len(view.exits) == len(view.nodes) and all(e.code == 0 for e in view.exits):
        return Decision(Action.SUCCEED, "every node finished", ExitCode.FINISHED)
    return Decision(Action.CONTINUE, "running")
