"""Typed events: one type per kind, one object per event in the job store, with a schema version.

An `Event` is the envelope every event shares (time, kind, message, node, attempt) plus its
kind's typed `data` (an `EventData` subclass whose fields are validated when the event is
written and when it is read). Readers (`trainctl events`, `status`, the goodput ledger) match
on the data's type and read plain typed fields; an event whose fields do not fit its kind is
skipped with a warning naming it (`BadEvent`), never guessed at.

Schema versions: 2 is this one (the envelope's ``v``). Version 1 (no ``v``: the stores of
earlier releases) has the same fields and reads the same way. A newer version than this
release knows is refused by name: upgrade trainctl to read it.

Kinds a release does not know (a worker's own ``ctx.event("my_kind", ...)``) are kept as
`EventData` with whatever fields they carried.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from trainctl.errors import first_problem

E = TypeVar("E", bound="EventData")

SCHEMA_VERSION = 2
"""The event schema this release writes (the ``v`` field; absent in version 1)."""


class BadEvent(ValueError):
    """An event object that does not fit its schema (the message says which field and why)."""


class EventData(BaseModel):
    """The fields of one event kind. Unknown extra fields are kept (newer writers, workers)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    KIND: ClassVar[str] = ""


_KINDS: dict[str, type[EventData]] = {}


def kind(name: str) -> Any:
    """Class decorator: register an `EventData` subclass as the type of events `name`."""

    def register(cls: type[EventData]) -> type[EventData]:
        cls.KIND = name
        _KINDS[name] = cls
        return cls

    return register


def data_type(event_kind: str) -> type[EventData]:
    """The data type of `event_kind` (`EventData` for kinds this release does not know)."""
    return _KINDS.get(event_kind, EventData)


# -- the job ------------------------------------------------------------------------------------
@kind("job_created")
class JobCreated(EventData):
    target: str | None = None
    scheduler: str | None = None


@kind("submitted")
class Submitted(EventData):
    slurm_job_id: str
    script: str | None = None


@kind("job_resumed")
class JobResumed(EventData):
    committed_step: int | None = None


class JobEnded(EventData):
    exit_code: int | None = None
    blamed: str | None = None


@kind("job_succeeded")
class JobSucceeded(JobEnded):
    pass


@kind("job_failed")
class JobFailed(JobEnded):
    pass


@kind("job_stopped")
class JobStopped(JobEnded):
    pass


@kind("job_cancelled")
class JobCancelled(JobEnded):
    by: str = ""
    """``user@host`` of the shell that asked."""
    request: str = ""
    """The request's id (``jobs/<id>/cancel/<request>.json``)."""


@kind("job_gave_up")
class JobGaveUp(JobEnded):
    pass


@kind("requeue")
class Requeued(EventData):
    excluded: list[str] = []


@kind("lease_taken")
class LeaseTaken(EventData):
    """This controller took the job's lease (over an expired one when `previous` is set)."""

    host: str
    pid: int
    previous: str | None = None


@kind("lease_lost")
class LeaseLost(EventData):
    holder: str | None = None


# -- attempts and recovery ----------------------------------------------------------------------
@kind("attempt_started")
class AttemptStarted(EventData):
    nodes: list[str] = []
    world_size: int | None = None
    rdzv: str | None = None
    promoted: list[str] = []
    shrunk: bool = False
    excluded: list[str] = []


@kind("attempt_ended")
class AttemptEnded(EventData):
    outcome: str
    """succeeded, failed, stopped, or controller_lost."""
    reason: str = ""
    cause: str | None = None
    blamed: str | None = None
    first_step: int | None = None
    first_step_at: float | None = None
    last_step: int | None = None
    last_step_at: float | None = None
    restored_step: int | None = None
    failed_at: float | None = None
    """When the failure happened, by the best evidence the controller had."""
    decided_at: float | None = None


@kind("first_step")
class FirstStep(EventData):
    step: int
    restored_step: int | None = None


@kind("recovery")
class RecoveryPlanned(EventData):
    action: str = "relaunch"
    cause: str | None = None
    next_attempt: int | None = None
    nodes: list[str] = []
    promoted: list[str] = []
    shrunk: bool = False


@kind("result")
class ResultReported(EventData):
    final_step: int
    fingerprint: str


@kind("fault_injected")
class FaultInjected(EventData):
    fault: str
    spec: str = ""
    step: int | None = None


@kind("cleanup")
class Cleanup(EventData):
    pids: list[int] = []


# -- nodes --------------------------------------------------------------------------------------
@kind("agent_connected")
class AgentConnected(EventData):
    pid: int | None = None


@kind("spare_lost")
class SpareLost(EventData):
    pass


@kind("fence_failed")
class FenceFailed(EventData):
    """The checkpoint fence could not be raised for an attempt (it runs unfenced)."""

    attempt: int
    error: str


@kind("node_started")
class NodeStarted(EventData):
    agent_pid: int | None = None
    torchrun_pid: int | None = None
    workers: int | None = None
    """The workers its torchrun starts (``nproc_per_node: gpu``: the GPUs it found)."""


@kind("node_exited")
class NodeExited(EventData):
    code: int
    errors: list[str] = []
    stopped: bool = False
    crashes: list[str] = []
    """How its workers died: exit signals, the kernel's OOM-killer lines."""


@kind("node_verdict")
class NodeVerdictChanged(EventData):
    phase: str
    status: str
    reason: str = ""


@kind("verdict_unreadable")
class VerdictUnreadable(EventData):
    pass


@kind("node_events")
class NodeEvents(EventData):
    """Per-node events of one kind folded into one (`trainctl.recovery.fold`): an attempt of
    4,096 nodes starts with three such events a node, each one file written and synced."""

    of_kind: str
    """The kind folded (``agent_connected``, ``node_started``, an OK ``node_verdict``, a
    stopped or finished ``node_exited``)."""
    nodes: list[str]
    data: dict[str, dict[str, Any]] = {}
    """Each node's event data, as its own event would have carried it."""
    until: float | None = None
    """When the last of them happened (the event's own time is the first's)."""


@kind("node_excluded")
class NodeExcluded(EventData):
    reason: str = ""
    cause: str = ""
    expires_at: float


@kind("node_readmitted")
class NodeReadmitted(EventData):
    pass


@kind("node_reprobe")
class NodeReprobe(EventData):
    pass


@kind("gpu_idle")
class GpuIdle(EventData):
    """A node's GPUs idle while the job's other nodes are busy (one event per episode; a
    warning: nothing is excluded for it). `trainctl.health.utilisation.judge_idle`."""

    mean_util_pct: float
    min_util_pct: float | None = None
    others_util_pct: float
    """The median of the other nodes' mean utilisation."""
    threshold_pct: float
    window_s: float
    num_samples: int


@kind("gpu_idle_cleared")
class GpuIdleCleared(EventData):
    """The node's GPUs are busy again (or the others idle too): its idle episode ended."""

    mean_util_pct: float
    others_util_pct: float


@kind("straggler")
class Straggler(EventData):
    """The evidence of `trainctl.health.progress.detect_stragglers` as extra fields."""


@kind("straggler_cleared")
class StragglerCleared(EventData):
    pass


@kind("hang_detected")
class HangDetected(EventData):
    timeout_s: float
    explanation: str
    ranks: list[dict[str, Any]] = []


@kind("stacks_saved")
class StacksSaved(EventData):
    dumps: list[dict[str, Any]] = []
    duration_s: float | None = None


@kind("control_refused")
class ControlRefused(EventData):
    """A control message (or connection) refused: malformed, unknown, or without the token."""

    reason: str
    peer: str | None = None


@kind("event_refused")
class EventRefused(EventData):
    """A worker's event whose fields do not fit its kind (recorded instead of it)."""

    refused_kind: str
    problem: str


# -- checkpoints (reported by rank 0 of the workers) ----------------------------------------------
class WorkerEventData(EventData):
    rank: int | None = None


@kind("checkpoint_committed")
class CheckpointCommitted(WorkerEventData):
    step: int
    path: str | None = None
    size_bytes: int | None = None
    world_size: int | None = None
    stall_s: float = 0.0
    """How long `save` blocked training."""
    upload_s: float | None = None
    durable_s: float | None = None
    """`save` called -> manifest committed."""


@kind("checkpoint_failed")
class CheckpointFailed(WorkerEventData):
    step: int | None = None
    error: str = ""
    tier: str | None = None


@kind("checkpoint_skipped")
class CheckpointSkipped(WorkerEventData):
    step: int | None = None
    reason: str = ""
    tier: str | None = None
    skipped: int | None = None
    """Memory tier: saves skipped since the node's last such event."""


@kind("checkpoint_restored")
class CheckpointRestored(WorkerEventData):
    step: int
    size_bytes: int | None = None
    saved_world_size: int | None = None
    world_size: int | None = None
    restore_s: float | None = None
    tier: str | None = None
    """Where the step was read from: ``memory`` (host shared memory) or ``durable`` (storage)."""


@kind("restore_skipped")
class RestoreSkipped(WorkerEventData):
    step: int | None = None
    reason: str = ""
    tier: str | None = None


@kind("gc_deleted")
class GcDeleted(WorkerEventData):
    path: str | None = None
    step: int | None = None
    kind: str | None = None
    reason: str = ""


@kind("gc_failed")
class GcFailed(WorkerEventData):
    error: str = ""


@kind("probe_error")
class ProbeError(EventData):
    pass


JOB_END_KINDS = frozenset({JobSucceeded.KIND, JobFailed.KIND, JobStopped.KIND, JobGaveUp.KIND})
"""Events that end a job (a later ``job_resumed`` and ``attempt_started`` may continue it)."""


def make_data(event_kind: str, fields: dict[str, Any]) -> EventData:
    """Validate `fields` as the data of an `event_kind` event; raises `BadEvent`."""
    try:
        return data_type(event_kind).model_validate(fields)
    except ValidationError as bad:
        raise BadEvent(f"{event_kind}: {first_problem(bad)}") from None


D = TypeVar("D", bound=EventData)


@dataclasses.dataclass(frozen=True)
class Event(Generic[D]):
    """One thing that happened, stored as one object (object stores cannot append)."""

    time: float
    message: str
    data: D
    node: str | None = None
    attempt: int | None = None
    kind: str = ""
    """The data's kind (set from it when left empty)."""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", type(self.data).KIND)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "time": self.time,
            "kind": self.kind,
            "message": self.message,
            "node": self.node,
            "attempt": self.attempt,
            "data": self.data.model_dump(mode="json"),
        }

    def of(self, kind: type[E]) -> Event[E] | None:
        """This event typed as `kind`'s, or None when it is of another kind."""
        return cast("Event[E]", self) if isinstance(self.data, kind) else None

    @staticmethod
    def from_json(raw: Any) -> Event[EventData]:
        """Decode a stored event (schema 1 or 2); raises `BadEvent` saying what is wrong."""
        event_kind, when, node, attempt, data = _envelope(raw)
        return Event(
            time=when,
            message=str(raw.get("message", "")),
            data=make_data(event_kind, data),
            node=node,
            attempt=attempt,
            kind=event_kind,
        )


def _envelope(raw: Any) -> tuple[str, float, str | None, int | None, dict[str, Any]]:
    """A stored event's kind, time, node, attempt and (unread) data, each checked; raises
    `BadEvent` saying what is wrong."""
    if not isinstance(raw, dict):
        raise BadEvent(f"not a JSON object: {type(raw).__name__}")
    version = raw.get("v", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BadEvent(
            f"schema version {version!r} is newer than this trainctl reads "
            f"({SCHEMA_VERSION}): upgrade trainctl"
        )
    event_kind, when = raw.get("kind"), raw.get("time")
    if not isinstance(event_kind, str) or not event_kind:
        raise BadEvent(f"kind: expected a name, got {event_kind!r}")
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        raise BadEvent(f"time: expected a number, got {when!r}")
    node, attempt = raw.get("node"), raw.get("attempt")
    if node is not None and not isinstance(node, str):
        raise BadEvent(f"node: expected a name, got {node!r}")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
        raise BadEvent(f"attempt: expected an integer, got {attempt!r}")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise BadEvent(f"data: expected an object, got {type(data).__name__}")
    return event_kind, float(when), node, attempt, data


UNREAD_DATA = EventData()
"""The data of an event read by `envelope_from_json` (its own fields were not read)."""


def envelope_from_json(raw: Any) -> Event[EventData]:
    """A stored event whose envelope (version, kind, time, message, node, attempt) is checked
    as `Event.from_json` checks it and whose data is left unread (`UNREAD_DATA`): for readers
    that only need when, which kind and where of the events they do not interpret (the goodput
    ledger's evidence of a controller alive), at a fraction of the cost. Raises `BadEvent` for
    a bad envelope (with `from_json`'s messages)."""
    event_kind, when, node, attempt, _data = _envelope(raw)
    return Event(
        time=when,
        message=str(raw.get("message", "")),
        data=UNREAD_DATA,
        node=node,
        attempt=attempt,
        kind=event_kind,
    )
