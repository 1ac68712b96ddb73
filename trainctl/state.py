"""Job, attempt and node states, their allowed transitions, and the records the store keeps.

A *job* lives across attempts (and scheduler requeues); an *attempt* is one launch of the
node agents and their torchrun processes; a *node* is one host (or simulated host) in an
attempt. Each state has a documented meaning; an illegal transition is a bug and raises.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from pydantic import TypeAdapter, ValidationError

from trainctl.errors import first_problem


class JobState(str, enum.Enum):
    PENDING = "pending"
    """Accepted and stored; nothing started yet."""
    RUNNING = "running"
    """An attempt is running."""
    RECOVERING = "recovering"
    """An attempt failed; trainctl is restoring and relaunching."""
    SUCCEEDED = "succeeded"
    """Every worker exited 0."""
    FAILED = "failed"
    """Ended with a failure; a retry (requeue or `trainctl resume`) is allowed."""
    STOPPED = "stopped"
    """Stopped on request (Ctrl-C, SIGTERM, preemption)."""
    CANCELLED = "cancelled"
    """Cancelled by someone (`trainctl cancel`): not to be resumed or requeued unasked."""

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.CANCELLED)


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.RUNNING, JobState.FAILED, JobState.STOPPED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.RECOVERING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.STOPPED,
            JobState.CANCELLED,
        }
    ),
    JobState.RECOVERING: frozenset(
        {JobState.RUNNING, JobState.FAILED, JobState.STOPPED, JobState.CANCELLED}
    ),
    # RUNNING -> RECOVERING also covers `trainctl resume` after the controller itself died.
    # A failed or stopped job may be resumed; a succeeded one is final.
    JobState.FAILED: frozenset({JobState.RUNNING, JobState.PENDING, JobState.RECOVERING}),
    JobState.STOPPED: frozenset({JobState.RUNNING, JobState.PENDING, JobState.RECOVERING}),
    JobState.SUCCEEDED: frozenset(),
    # `trainctl resume --force` only.
    JobState.CANCELLED: frozenset({JobState.RUNNING, JobState.PENDING, JobState.RECOVERING}),
}


class AttemptState(str, enum.Enum):
    STARTING = "starting"
    """Node agents are starting, probing and joining the rendezvous."""
    RUNNING = "running"
    """Workers are running."""
    SUCCEEDED = "succeeded"
    """Every node's torchrun exited 0."""
    FAILED = "failed"
    """A node or worker failed."""
    STOPPED = "stopped"
    """Stopped on request."""


ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.STARTING: frozenset(
        {AttemptState.RUNNING, AttemptState.FAILED, AttemptState.STOPPED, AttemptState.SUCCEEDED}
    ),
    AttemptState.RUNNING: frozenset(
        {AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.STOPPED}
    ),
    AttemptState.SUCCEEDED: frozenset(),
    AttemptState.FAILED: frozenset(),
    AttemptState.STOPPED: frozenset(),
}


class NodeState(str, enum.Enum):
    PENDING = "pending"
    """Planned; its agent has not reported yet."""
    STARTING = "starting"
    """Agent up, probing health / joining the rendezvous."""
    RUNNING = "running"
    """torchrun and its workers are running."""
    SUCCEEDED = "succeeded"
    """torchrun exited 0."""
    FAILED = "failed"
    """torchrun exited non-zero, or the agent vanished."""
    STOPPED = "stopped"
    """Stopped on request."""
    EXCLUDED = "excluded"
    """Kept out of the job (unhealthy or blamed)."""
    SPARE = "spare"
    """On standby, ready to replace a failed node."""


_RELAUNCHABLE = frozenset(
    {NodeState.STARTING, NodeState.SPARE, NodeState.EXCLUDED, NodeState.PENDING}
)
"""Where a node goes after an attempt ended: into the next attempt, back on standby, or out."""

NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.PENDING: frozenset(
        {
            NodeState.STARTING,
            NodeState.FAILED,
            NodeState.STOPPED,
            NodeState.EXCLUDED,
            NodeState.SPARE,
        }
    ),
    NodeState.SPARE: frozenset(
        {
            NodeState.PENDING,
            NodeState.STARTING,
            NodeState.STOPPED,
            NodeState.EXCLUDED,
            NodeState.FAILED,
        }
    ),
    NodeState.STARTING: frozenset(
        {
            NodeState.RUNNING,
            NodeState.FAILED,
            NodeState.STOPPED,
            NodeState.EXCLUDED,
            NodeState.SUCCEEDED,
        }
    ),
    NodeState.RUNNING: frozenset(
        {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.STOPPED, NodeState.EXCLUDED}
    ),
    # After an attempt: relaunched, put on standby, or kept out.
    NodeState.SUCCEEDED: _RELAUNCHABLE,
    NodeState.FAILED: _RELAUNCHABLE,
    NodeState.STOPPED: _RELAUNCHABLE,
    # Readmitted once the exclusion expired and a probe came back clean.
    NodeState.EXCLUDED: frozenset({NodeState.PENDING, NodeState.SPARE, NodeState.STARTING}),
}


class IllegalTransition(RuntimeError):
    """A state machine was asked to make a move its table forbids: a bug in trainctl."""


def check_transition(table: dict[Any, frozenset[Any]], current: Any, new: Any) -> None:
    """Raise IllegalTransition unless `current -> new` is allowed (staying put is allowed)."""
    if current != new and new not in table[current]:
        raise IllegalTransition(f"{type(current).__name__}: {current.value} -> {new.value}")


@dataclasses.dataclass
class NodeRecord:
    name: str
    state: NodeState = NodeState.PENDING
    pid: int | None = None
    host: str = "127.0.0.1"
    exit_code: int | None = None
    reason: str = ""
    step: int | None = None

    def move(self, new: NodeState, reason: str = "") -> None:
        check_transition(NODE_TRANSITIONS, self.state, new)
        self.state = new
        if reason:
            self.reason = reason


@dataclasses.dataclass
class AttemptRecord:
    number: int
    started_at: float
    state: AttemptState = AttemptState.STARTING
    ended_at: float | None = None
    world_size: int = 0
    nodes: list[str] = dataclasses.field(default_factory=list)
    exit_code: int | None = None
    reason: str = ""
    scheduler_restart_count: int | None = None
    """Slurm's SLURM_RESTART_COUNT when the attempt started (None: first run or not Slurm)."""
    cause: str | None = None
    """How the policy classified the failure (node_fault, worker_crash, ...)."""
    blamed: str | None = None
    restored_step: int | None = None
    """The checkpoint step the attempt restored (None: none reported)."""
    first_step: int | None = None
    first_step_at: float | None = None
    last_step: int | None = None
    last_step_at: float | None = None

    def move(self, new: AttemptState, reason: str = "") -> None:
        check_transition(ATTEMPT_TRANSITIONS, self.state, new)
        self.state = new
        if reason:
            self.reason = reason


@dataclasses.dataclass
class JobRecord:
    """Everything the store keeps about a job: ``state.json`` and its pieces
    (`trainctl.state_pieces`), assembled whole by `JobStore.read_state`."""

    job_id: str
    name: str
    created_at: float
    updated_at: float
    state: JobState = JobState.PENDING
    reason: str = ""
    scheduler: str = "local"
    scheduler_job_id: str | None = None
    """The scheduler's id for the job (Slurm: the job id sbatch printed)."""
    controller_pid: int | None = None
    controller_host: str | None = None
    nodes: list[NodeRecord] = dataclasses.field(default_factory=list)
    attempts: list[AttemptRecord] = dataclasses.field(default_factory=list)
    step: int | None = None
    final_step: int | None = None
    fingerprint: str | None = None
    exit_code: int | None = None
    restarts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Relaunches so far, by failure cause (the budgets in the recipe's ``recovery:``)."""
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Recent failure signatures with the newest committed step at the time (crash loops)."""
    committed_step: int | None = None
    """Newest checkpoint step committed during this job, as reported by the workers."""
    faults_fired: list[str] = dataclasses.field(default_factory=list)
    """Injected faults already fired (so `resume` does not fire them again)."""
    cancel: dict[str, Any] | None = None
    """The cancel request the job ended on (`trainctl.cancel.CancelRequest`), if any."""
    cancels_cleared: list[str] = dataclasses.field(default_factory=list)
    """Cancel requests `resume --force` set aside (honoured once, never again)."""

    def move(self, new: JobState, reason: str = "") -> None:
        check_transition(JOB_TRANSITIONS, self.state, new)
        self.state = new
        if reason:
            self.reason = reason

    def node(self, name: str) -> NodeRecord:
        """The node's record: a lookup by position, checked, rebuilt when the list changed
        (the controller asks for every message of every node; a scan of 1,024 records each
        time did not scale)."""
        positions: dict[str, int] = self.__dict__.get("_positions") or {}
        at = positions.get(name)
        if at is None or at >= len(self.nodes) or self.nodes[at].name != name:
            positions = {record.name: i for i, record in enumerate(self.nodes)}
            self.__dict__["_positions"] = positions
            at = positions.get(name)
            if at is None:
                raise KeyError(name)
        return self.nodes[at]

    def to_json(self) -> dict[str, Any]:
        # pydantic's compiled serialiser, not `dataclasses.asdict` (which deep-copies every
        # field through Python: 26 ms for a 1,024-node record, rewritten every few seconds).
        data: dict[str, Any] = _RECORD.dump_python(self)
        data["version"] = STATE_VERSION
        data["state"] = self.state.value
        for node in data["nodes"]:
            node["state"] = node["state"].value
        for attempt in data["attempts"]:
            attempt["state"] = attempt["state"].value
        return data

    @classmethod
    def from_json(cls, data: Any) -> JobRecord:
        """Decode ``state.json``. Raises ValueError naming the first field that does not fit
        (a newer version than this release reads is refused by name)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(
                f"version {version!r} is newer than this trainctl reads ({STATE_VERSION}): "
                "upgrade trainctl"
            )
        try:
            return _RECORD.validate_python(data)
        except ValidationError as bad:
            raise ValueError(first_problem(bad)) from None


STATE_VERSION = 3
"""The ``state.json`` layout this release writes: 3, the job-level fields with the nodes and
attempts in pieces beside it (`trainctl.state_pieces`); 1 (without the field) and 2 hold the
whole record and read alike."""

_RECORD: TypeAdapter[JobRecord] = TypeAdapter(JobRecord)
