"""Pure decisions: what the controller does next, and why.

`observe(view, observations)` folds what just happened into the attempt as the controller sees
it; `decide(now, view)` returns a `Decision`: an action plus a sentence a person can read in
`trainctl status` and the event log, and the node to blame where there is evidence. No clocks,
processes or storage are touched here.

Node faults the view records (for recovery to exclude or replace the blamed node): a node
agent lost, an UNHEALTHY health verdict (before joining or while running) and a hang whose
evidence points at one node.

After a failed attempt, `plan_recovery` decides what comes next: exclude the blamed node,
promote a spare or shrink, relaunch, or end the job (exit 1 for the scheduler to requeue when
the allocation cannot continue; exit 3 when the same failure keeps repeating with no new
checkpoint). Software errors (a Python exception that is not a lost connection) never blame a
node.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence

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


def _error_signature(message: str) -> str:
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
    for exit_ in failures:
        if exit_.code < 0:
            return Decision(
                Action.FAIL,
                describe_exit(exit_),
                ExitCode.FAILED,
                cause=Cause.WORKER_CRASH,
                signature=f"crash:{exit_.code}",
            )
        storage = [e for e in exit_.errors if e and is_storage_error(e)]
        own = [e for e in exit_.errors if e and not is_communication_error(e)]
        if storage:
            return Decision(
                Action.FAIL,
                describe_exit(dataclasses.replace(exit_, errors=(storage[0],))),
                ExitCode.FAILED,
                cause=Cause.STORAGE,
                signature=f"storage:{_error_signature(storage[0])}",
            )
        if own:
            return Decision(
                Action.FAIL,
                describe_exit(dataclasses.replace(exit_, errors=(own[0],))),
                ExitCode.FAILED,
                cause=Cause.SOFTWARE_ERROR,
                signature=f"software:{_error_signature(own[0])}",
            )
    silent = [e for e in failures if not e.errors]
    suspect = silent[0] if silent else failures[0]
    # The signature leaves the node out: which node reports first is a race when every node
    # fails alike, and a crash loop is the same crash wherever it lands.
    return Decision(
        Action.FAIL,
        describe_exit(suspect),
        ExitCode.FAILED,
        cause=Cause.WORKER_CRASH,
        signature=f"crash:{suspect.code}",
    )


def decide(now: float, view: AttemptView) -> Decision:
    """The next action for an attempt, with its reason."""
    if view.stop is not None:
        preempted = view.stop.signal in ("SIGTERM", "SIGUSR1")
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
    if view.lost:
        first = min(view.lost, key=lambda x: x.time)
        return Decision(
            Action.FAIL,
            f"{first.node}: node agent lost",
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


# -- after a failed attempt ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A blocklist entry: a node kept out of the job, why, and until when."""

    node: str
    reason: str
    cause: str
    since: float
    expires_at: float

    def active(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Exclusion:
        return cls(
            node=str(data["node"]),
            reason=str(data.get("reason", "")),
            cause=str(data.get("cause", "")),
            since=float(str(data.get("since", 0.0))),
            expires_at=float(str(data.get("expires_at", 0.0))),
        )


@dataclasses.dataclass(frozen=True)
class NodeSelection:
    nodes: tuple[str, ...]
    promoted: tuple[str, ...] = ()
    """Spares (or readmitted nodes) that take a failed node's place."""
    shrunk: bool = False
    reason: str = ""


def select_nodes(
    want: int,
    fewest: int,
    preferred: Sequence[str],
    standby: Sequence[str],
    readmittable: Sequence[str] = (),
) -> NodeSelection | None:
    """Pick an attempt's nodes: `preferred` first (the survivors, in order), then spares on
    `standby`, then nodes whose exclusion expired (they must pass the preflight probe again).
    Fewer than `want` but at least `fewest`: shrink. Fewer than `fewest`: None."""
    candidates = list(dict.fromkeys([*preferred, *standby, *readmittable]))
    if len(candidates) < fewest or not candidates:
        return None
    nodes = tuple(candidates[:want])
    promoted = tuple(n for n in nodes if n not in preferred)
    shrunk = len(nodes) < want
    parts = []
    if promoted:
        parts.append(f"promoted {', '.join(promoted)}")
    if shrunk:
        parts.append(f"shrunk to {len(nodes)} of {want} node(s)")
    return NodeSelection(nodes, promoted, shrunk, "; ".join(parts))


class RecoveryAction(str, enum.Enum):
    RELAUNCH = "relaunch"
    """Relaunch inside the allocation on `Recovery.nodes`, restoring the newest checkpoint."""
    REQUEUE = "requeue"
    """The allocation cannot continue: end with exit 1 so the scheduler may requeue."""
    GIVE_UP = "give_up"
    """A crash loop or a bug: end with exit 3, do not requeue."""


@dataclasses.dataclass(frozen=True)
class FailureRecord:
    """One failed attempt, as crash-loop detection remembers it."""

    signature: str
    committed_step: int | None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> FailureRecord:
        step = data.get("committed_step")
        return cls(str(data.get("signature", "")), None if step is None else int(str(step)))


@dataclasses.dataclass(frozen=True)
class Budgets:
    """The recipe's retry limits (from `JobSpec.launch` and `JobSpec.recovery`)."""

    max_restarts: int
    per_cause: Mapping[str, int]
    crash_loop_limit: int
    exclude_s: float
    nodes: int
    fewest_nodes: int


@dataclasses.dataclass(frozen=True)
class Recovery:
    action: RecoveryAction
    reason: str
    exit_code: ExitCode | None = None
    selection: NodeSelection | None = None
    exclude: tuple[Exclusion, ...] = ()


def crash_loop_length(history: Sequence[FailureRecord], latest: FailureRecord) -> int:
    """How many failures in a row, ending with `latest`, share its signature with no new
    committed checkpoint between them."""
    count = 1
    for earlier in reversed(history):
        if earlier.signature != latest.signature or earlier.committed_step != latest.committed_step:
            break
        count += 1
    return count


def plan_recovery(
    now: float,
    decision: Decision,
    budgets: Budgets,
    restarts: Mapping[str, int],
    history: Sequence[FailureRecord],
    committed_step: int | None,
    active: Sequence[str],
    standby: Sequence[str],
    blocklist: Mapping[str, Exclusion],
) -> Recovery:
    """What to do after the attempt on `active` failed with `decision` (pure).

    `restarts` counts relaunches so far by cause, `history` the earlier failures (oldest
    first), `standby` the healthy spares, `blocklist` every exclusion (active or expired).
    """
    cause = decision.cause.value
    exclude: list[Exclusion] = []
    if decision.blamed is not None and decision.cause is Cause.NODE_FAULT:
        exclude.append(
            Exclusion(decision.blamed, decision.reason, cause, now, now + budgets.exclude_s)
        )
    latest = FailureRecord(decision.signature or decision.reason, committed_step)
    loop = crash_loop_length(history, latest)
    if loop >= budgets.crash_loop_limit:
        since = f"checkpoint step {committed_step}" if committed_step else "the start"
        return Recovery(
            RecoveryAction.GIVE_UP,
            f"crash loop: the same failure {loop} times in a row with no new checkpoint since "
            f"{since} ({decision.reason}); fix the cause, then `trainctl resume`",
            ExitCode.GAVE_UP,
            exclude=tuple(exclude),
        )
    total = sum(restarts.values())
    if total >= budgets.max_restarts:
        return Recovery(
            RecoveryAction.REQUEUE,
            f"{decision.reason} — restart budget spent ({total} of "
            f"launch.max_restarts={budgets.max_restarts})",
            ExitCode.FAILED,
            exclude=tuple(exclude),
        )
    budget = budgets.per_cause.get(cause, 3)
    if restarts.get(cause, 0) >= budget:
        bug = decision.cause is Cause.SOFTWARE_ERROR
        return Recovery(
            RecoveryAction.GIVE_UP if bug else RecoveryAction.REQUEUE,
            f"{decision.reason} — {cause} restarts spent ({restarts.get(cause, 0)} of "
            f"recovery.restarts_per_cause.{cause}={budget})",
            ExitCode.GAVE_UP if bug else ExitCode.FAILED,
            exclude=tuple(exclude),
        )
    out = {e.node for e in exclude} | {n for n, e in blocklist.items() if e.active(now)}
    expired = [n for n, e in sorted(blocklist.items()) if not e.active(now) and n not in out]
    survivors = [n for n in active if n not in out]
    spares = [n for n in standby if n not in out]
    selection = select_nodes(budgets.nodes, budgets.fewest_nodes, survivors, spares, expired)
    if selection is None:
        healthy = len(survivors) + len(spares) + len(expired)
        return Recovery(
            RecoveryAction.REQUEUE,
            f"{decision.reason} — cannot continue in this allocation: {healthy} usable "
            f"node(s), the job needs at least {budgets.fewest_nodes} (min_nodes)",
            ExitCode.FAILED,
            exclude=tuple(exclude),
        )
    what = selection.reason or "same nodes"
    return Recovery(
        RecoveryAction.RELAUNCH,
        f"relaunching on {', '.join(selection.nodes)} ({what}) after: {decision.reason}",
        selection=selection,
        exclude=tuple(exclude),
    )
