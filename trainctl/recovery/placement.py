"""Pure decisions about nodes and recovery: who runs, who waits, who is kept out, what next.

- `plan_recovery`: after a failed attempt, exclude the blamed node, promote a spare or shrink,
  relaunch — or end the job (exit 1 for the scheduler to requeue when the allocation cannot
  continue; exit 3 when the same failure keeps repeating with no new checkpoint).
- `first_selection`, `select_nodes`, `standby`, `pool`: an attempt's nodes and its spares.
- `excluded_now`, `expired`: which exclusions are in force (one definition for every caller).
- `reprobe`, `judge_standby`: bringing a node back after its exclusion, and what a verdict on
  standby means.
- `after_run`: what a scheduler-run controller asks its scheduler for when it ends.

Every function takes the time as an argument and returns a decision with its reason; the
controller and its adapters carry them out.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping, Sequence

from trainctl.exitcodes import ExitCode
from trainctl.health.verdict import Verdict
from trainctl.recovery.blame import FailureRecord
from trainctl.recovery.policy import Cause, Decision

__all__ = ["FailureRecord"]  # re-exported: crash-loop detection reads the job's failures


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
    def from_json(cls, node: str, data: Mapping[str, object]) -> Exclusion:
        """A ``blocklist.json`` entry; raises ValueError naming the field that does not fit."""
        times = {}
        for key in ("since", "expires_at"):
            value = data.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{node}.{key}: expected a number, got {value!r}")
            times[key] = float(value)
        return cls(
            node=str(data.get("node", node)),
            reason=str(data.get("reason", "")),
            cause=str(data.get("cause", "")),
            **times,
        )


Blocklist = Mapping[str, Exclusion]
"""Every exclusion of a job, active or expired, by node."""


def excluded_now(blocklist: Blocklist, now: float) -> frozenset[str]:
    """The nodes whose exclusion is still in force at `now`."""
    return frozenset(node for node, entry in blocklist.items() if entry.active(now))


def expired(blocklist: Blocklist, now: float) -> list[str]:
    """Nodes whose exclusion ran out (they may come back after a clean probe), sorted."""
    return sorted(node for node, entry in blocklist.items() if not entry.active(now))


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


NAMED_NODES = 8
"""A reason names at most this many nodes (the event's data lists them all)."""


def named(nodes: Sequence[str]) -> str:
    """Nodes for a reason: every name for a few, a count and the first ones for many (a
    reason of 1,024 names went into the record, the log and the terminal at every relaunch)."""
    if len(nodes) <= NAMED_NODES:
        return ", ".join(nodes)
    return f"{len(nodes)} nodes ({', '.join(nodes[:3])}, …, {nodes[-1]})"


def plan_recovery(
    now: float,
    decision: Decision,
    budgets: Budgets,
    restarts: Mapping[str, int],
    history: Sequence[FailureRecord],
    committed_step: int | None,
    active: Sequence[str],
    waiting: Sequence[str],
    blocklist: Blocklist,
) -> Recovery:
    """What to do after the attempt on `active` failed with `decision` (pure).

    `restarts` counts relaunches so far by cause, `history` the earlier failures (oldest
    first), `waiting` the healthy spares on standby, `blocklist` every exclusion (active or
    expired).
    """
    cause = decision.cause.value
    exclude: list[Exclusion] = []
    if decision.blamed is not None and decision.cause is Cause.NODE_FAULT:
        exclude.append(
            Exclusion(decision.blamed, decision.reason, cause, now, now + budgets.exclude_s)
        )
        why = f"lost with {decision.blamed} ({decision.reason})"
        for node in decision.lost_with:  # the same incident: one relaunch for all of them
            exclude.append(Exclusion(node, why, cause, now, now + budgets.exclude_s))
    if decision.deterministic:
        return Recovery(
            RecoveryAction.GIVE_UP,
            f"{decision.reason}; fix the cause, then `trainctl resume`",
            ExitCode.GAVE_UP,
            exclude=tuple(exclude),
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
    out = {e.node for e in exclude} | excluded_now(blocklist, now)
    returning = [n for n in expired(blocklist, now) if n not in out]
    survivors = [n for n in active if n not in out]
    spares = [n for n in waiting if n not in out]
    selection = select_nodes(budgets.nodes, budgets.fewest_nodes, survivors, spares, returning)
    if selection is None:
        healthy = len(survivors) + len(spares) + len(returning)
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
        f"relaunching on {named(selection.nodes)} ({what}) after: {decision.reason}",
        selection=selection,
        exclude=tuple(exclude),
    )


# -- which nodes run, and which wait ------------------------------------------------------------


def first_selection(
    want: int,
    fewest: int,
    names: Sequence[str],
    last_nodes: Sequence[str] | None,
    blocklist: Blocklist,
    now: float,
) -> NodeSelection | None:
    """The nodes of a controller's first attempt (a fresh job, a resume, a requeue).

    The last attempt's nodes first (after a Slurm requeue the allocation may hold other nodes:
    only those still among `names` count), then the others, then nodes whose exclusion
    expired; none while excluded. None: not enough usable nodes.
    """
    last = list(last_nodes) if last_nodes else list(names[:want])
    preferred = [n for n in last if n in names and n not in blocklist]
    standby = [n for n in names if n not in last and n not in blocklist]
    readmittable = [n for n in names if n in blocklist and not blocklist[n].active(now)]
    return select_nodes(want, fewest, preferred, standby, readmittable)


def standby(
    names: Sequence[str], active: Sequence[str], blocklist: Blocklist, now: float
) -> list[str]:
    """Nodes neither in the attempt nor excluded, in the job's order."""
    # A set: `active` is the attempt's tuple of names, and N lookups in a tuple of N names
    # were 5% of the controller's CPU at 1,024 nodes (the standby pool is checked each second).
    taken = set(active) | excluded_now(blocklist, now)
    return [n for n in names if n not in taken]


def pool(
    names: Sequence[str], active: Sequence[str], spares: int, blocklist: Blocklist, now: float
) -> list[str]:
    """The nodes whose agents should run: the attempt's, plus `spares` on standby."""
    return [*active, *standby(names, active, blocklist, now)[:spares]]


def reprobe(
    spares: int,
    waiting: Sequence[str],
    agents_up: Collection[str],
    active: Sequence[str],
    blocklist: Blocklist,
    now: float,
) -> tuple[list[str], str]:
    """Nodes whose exclusion expired to bring back for a standby probe, while the standby pool
    (`waiting`: spares with an agent) is short of `spares`; and why."""
    wanted = spares - len(waiting)
    candidates = [n for n in expired(blocklist, now) if n not in agents_up and n not in active]
    if wanted <= 0 or not candidates:
        return [], ""
    chosen = candidates[:wanted]
    return chosen, f"{', '.join(chosen)}: exclusion expired; probing before letting it back"


class StandbyAction(str, enum.Enum):
    KEEP = "keep"
    """Nothing changes: the node stays on standby (or stays excluded until its expiry)."""
    READMIT = "readmit"
    """The exclusion expired and the probe is clean: back on standby, ready to replace."""
    EXCLUDE = "exclude"
    """UNHEALTHY while waiting: excluded, its agent stopped."""


@dataclasses.dataclass(frozen=True)
class StandbyJudgement:
    action: StandbyAction
    reason: str
    exclusion: Exclusion | None = None


def judge_standby(
    node: str,
    status: Verdict,
    verdict_reason: str,
    exclusion: Exclusion | None,
    now: float,
    exclude_s: float,
) -> StandbyJudgement:
    """What a health verdict of a node that is not in the attempt (a spare, or a node whose
    exclusion ran out) means for it."""
    if status is Verdict.UNHEALTHY:
        reason = f"{node}: UNHEALTHY on standby: {verdict_reason}"
        entry = Exclusion(node, reason, "node_fault", now, now + exclude_s)
        return StandbyJudgement(StandbyAction.EXCLUDE, reason, entry)
    if exclusion is not None and not exclusion.active(now):
        return StandbyJudgement(
            StandbyAction.READMIT,
            f"{node}: exclusion expired and the probe is clean: back on standby",
        )
    return StandbyJudgement(StandbyAction.KEEP, "")


def silent_standby(node: str, silence: str, now: float, exclude_s: float) -> Exclusion:
    """A node off the attempt whose agent's heartbeats stopped: as lost as a node in it, and
    excluded the same way (its exclusion expires; a clean probe then readmits it)."""
    reason = f"{node}: agent {silence} on standby"
    return Exclusion(node, reason, "node_fault", now, now + exclude_s)


# -- after the controller ended -------------------------------------------------------------------


class AfterRunAction(str, enum.Enum):
    NONE = "none"
    """The job ended for good, or the scheduler will decide (nothing to do here)."""
    REQUEUE = "requeue"
    """Preempted with a checkpoint: the scheduler should run it again as it was."""
    REQUEUE_EXCLUDING = "requeue_excluding"
    """The allocation could not continue without blamed nodes: run again without them."""


@dataclasses.dataclass(frozen=True)
class AfterRun:
    action: AfterRunAction
    reason: str
    excluded: tuple[str, ...] = ()
    drain: bool = False
    """Also drain the excluded nodes (the recipe's `slurm.drain_blamed_nodes`)."""


def after_run(
    code: ExitCode, blocklist: Blocklist, now: float, drain_blamed_nodes: bool
) -> AfterRun:
    """What a scheduler-run controller asks its scheduler for when it ends with `code`.

    Preempted (4): requeue — the next run resumes from the checkpoint just committed. Failed
    (1) with nodes excluded (the allocation could not continue): requeue with them excluded
    (and drained when the recipe says so). Anything else ends the job for the scheduler.
    """
    out = tuple(sorted(excluded_now(blocklist, now)))
    if code == ExitCode.FAILED and out:
        return AfterRun(
            AfterRunAction.REQUEUE_EXCLUDING,
            f"requeued by trainctl, excluding {', '.join(out)}",
            out,
            drain_blamed_nodes,
        )
    if code == ExitCode.PREEMPTED:
        return AfterRun(AfterRunAction.REQUEUE, "requeued by trainctl after preemption")
    return AfterRun(AfterRunAction.NONE, "")
