"""Every message between controller, node agents and workers, and every TRAINCTL_* name.

Three links, each carrying the typed messages defined here and nothing else:

- controller <-> node agent: one TCP connection per node, one JSON object per line
  (`encode_line` / `decode_line`). Every line carries the job's control token (a random value
  the controller makes when it starts and gives its agents in their environment): a line
  without it, with another token, malformed, or of an unknown type raises `ProtocolError`; the
  receiver drops it (and the controller records it as an event) — never a crash.
- worker -> node agent: Unix datagrams on the agent's abstract socket (`encode_datagram` /
  `decode_datagram`), carrying the node's worker token.
- the environment: `Env` names every variable trainctl sets for its own processes, once
  (defined in the light `trainctl.env`, which the worker shim imports alone, and re-exported
  here).

Messages are frozen dataclasses; `decode_*` validates every field against its annotation
(pydantic), so a receiver sees a typed value or a `ProtocolError`, never a half-read dict.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from trainctl.env import STACK_DUMP_SIGNAL, Env, unix_address
from trainctl.errors import first_problem
from trainctl.health.readings import UtilisationSample

if TYPE_CHECKING:
    from pydantic import TypeAdapter


def new_token() -> str:
    """A fresh random token (128 bits) for a control link."""
    return secrets.token_hex(16)


class ProtocolError(ValueError):
    """A line or datagram that is not a valid message for this link (the reason says why)."""


# -- shared payloads ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GatePlan:
    """What each node agent's health gate checks, before joining and every `probe_interval_s`.

    The agent also tests that the rendezvous endpoint accepts a TCP connection.
    """

    paths: tuple[str, ...]
    """Directories needing free space: the run directory, the store and the checkpoint root
    (object-store URLs are listed as skipped by the gate)."""
    min_free_disk_gb: float = 1.0
    require_nvml: bool = False
    """False: a machine without NVML passes (fail-open); True: missing NVML is UNHEALTHY."""
    probe_interval_s: float = 30.0
    """0: probe only before starting torchrun."""

    def describe(self) -> str:
        nvml = "NVML required" if self.require_nvml else "NVML fail-open when absent"
        every = (
            f"re-probe every {self.probe_interval_s:g} s"
            if self.probe_interval_s
            else "no re-probes while running"
        )
        return (
            f"health gate: free disk >= {self.min_free_disk_gb:g} GiB at "
            f"{', '.join(self.paths)}; rendezvous reachable; {nvml}; {every}"
        )


Sample = tuple[int, float | None, float | None]
"""One step of one rank: (step, wall-clock step time, busy time)."""


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """A rank's latest progress as its agent forwards it, with every step since the last."""

    step: int
    time: float | None = None
    step_time: float | None = None
    busy_time: float | None = None
    saving: bool = False
    """A checkpoint save of `step` is in progress (the hang timeout gets its allowance)."""
    samples: tuple[Sample, ...] = ()


@dataclasses.dataclass(frozen=True)
class ErrorFile:
    """One error.json torchrun's ``@record`` (or trainctl.runtime) wrote for a dead worker."""

    file: str
    message: str
    timestamp: float = 0.0
    local_rank: str = ""


@dataclasses.dataclass(frozen=True)
class StackDump:
    """One worker's stacks, dumped by its agent (`trainctl.launch.stacks`)."""

    rank: int
    local_rank: int
    pid: int
    state: str | None
    method: str | None
    text: str | None
    failures: tuple[str, ...] = ()
    nccl_seq: int | None = None
    """NCCL's flight recorder (GPUs): the last collective this rank enqueued, when it dumped."""
    nccl_pending: str | None = None
    """... and the oldest it had not completed."""
    flight_recorder: str | None = None
    """The recorder itself, trimmed to its newest collectives (JSON; `flight_recorder.trimmed`),
    stored beside the stacks for people and torch's analyser."""


# -- messages -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """Agent -> controller, first on every connection."""

    TYPE: ClassVar[str] = "hello"
    pid: int
    holder: str = ""
    """host:port of the node's memory-tier holder (`trainctl.checkpoint.holder`); "" if none."""


@dataclasses.dataclass(frozen=True)
class VerdictReport(Message):
    """Agent -> controller: a health gate or probe result (``nodes/<node>.json``'s document,
    decoded by `NodeVerdictRecord.from_dict`)."""

    TYPE: ClassVar[str] = "verdict"
    phase: str
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GpuUsage(Message):
    """Agent -> controller: how busy the node's GPUs are (`UtilisationSample`), taken with each
    health probe (`phase`: ``preflight``, ``running`` or ``standby``). Stored as the job's GPU
    time series, not as events."""

    TYPE: ClassVar[str] = "gpu_usage"
    phase: str
    sample: UtilisationSample


@dataclasses.dataclass(frozen=True)
class Started(Message):
    TYPE: ClassVar[str] = "started"
    pid: int
    torchrun_pid: int
    workers: int = 0
    """How many workers this torchrun starts (0: not said, an agent of an earlier release)."""


@dataclasses.dataclass(frozen=True)
class Progress(Message):
    """Agent -> controller: per rank (a string key, as JSON has it) its latest heartbeat."""

    TYPE: ClassVar[str] = "progress"
    ranks: dict[str, Heartbeat]


@dataclasses.dataclass(frozen=True)
class Result(Message):
    """Worker -> agent -> controller: the finished job's final step and weight fingerprint."""

    TYPE: ClassVar[str] = "result"
    rank: int
    final_step: int
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class WorkerEvent(Message):
    """Worker -> agent -> controller: an event for the job store (e.g. a checkpoint commit);
    `data` is validated against the kind's event type by the journal."""

    TYPE: ClassVar[str] = "event"
    kind: str
    message: str
    rank: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StacksReport(Message):
    TYPE: ClassVar[str] = "stacks"
    dumps: tuple[StackDump, ...]
    duration_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Exit(Message):
    """Agent -> controller: the attempt's torchrun ended (or never started: `stopped`)."""

    TYPE: ClassVar[str] = "exit"
    code: int
    stopped: bool = False
    reason: str = ""
    errors: tuple[ErrorFile, ...] = ()
    killed_leftovers: int = 0
    crashes: tuple[str, ...] = ()
    """How workers died without an exception of their own: signals, the OOM killer's lines
    (`trainctl.launch.evidence`)."""
    flight_recorders: dict[str, str] = dataclasses.field(default_factory=dict)
    """rank -> the flight recorder NCCL's watchdog dumped when a collective timed out or
    failed (trimmed JSON, `flight_recorder.trimmed`); empty when none did."""


@dataclasses.dataclass(frozen=True)
class WorkerProgress(Message):
    """Worker -> agent: `step` steps completed (or a save of `step` started: `saving`)."""

    TYPE: ClassVar[str] = "progress"
    rank: int
    step: int
    time: float
    step_time: float | None = None
    busy_time: float | None = None
    saving: bool = False


@dataclasses.dataclass(frozen=True)
class Launch(Message):
    """Controller -> agent: run the attempt whose `LaunchPlan` is in the JSON file `plan`."""

    TYPE: ClassVar[str] = "launch"
    plan: str
    holders: dict[str, str] = dataclasses.field(default_factory=dict)
    """The attempt's memory-tier holders (node -> host:port, plan order); empty: tier off."""
    replicas: int = 0
    """``checkpoint.memory.replicas``: peers that hold a copy of each node's memory steps."""
    slots: int = 2
    """``checkpoint.memory.slots``: slots per copy (own and held)."""


@dataclasses.dataclass(frozen=True)
class Stop(Message):
    """Controller -> agent: end the attempt (``kill``: SIGKILL at once; ``graceful``: SIGTERM,
    the grace, then SIGKILL, so workers can checkpoint)."""

    TYPE: ClassVar[str] = "stop"
    reason: str
    mode: Literal["graceful", "kill"] = "graceful"


@dataclasses.dataclass(frozen=True)
class Probe(Message):
    """Controller -> agent: probe now (a spare on standby) and report a verdict."""

    TYPE: ClassVar[str] = "probe"
    phase: str
    gate: GatePlan
    rdzv: str | None = None


@dataclasses.dataclass(frozen=True)
class WarmUp(Message):
    """Controller -> agent: have a torchrun importing torch for the next attempt."""

    TYPE: ClassVar[str] = "warm_up"
    log_path: str


@dataclasses.dataclass(frozen=True)
class DumpStacks(Message):
    TYPE: ClassVar[str] = "dump_stacks"
    reason: str


@dataclasses.dataclass(frozen=True)
class Shutdown(Message):
    """Controller -> agent: the node leaves the job; the agent ends."""

    TYPE: ClassVar[str] = "shutdown"
    reason: str


@dataclasses.dataclass(frozen=True)
class Beat(Message):
    """Either way, every `LivenessPolicy.interval_s`: the sender is alive. Judged by the
    receiver's transport (`trainctl.health.liveness`), never queued as a message."""

    TYPE: ClassVar[str] = "beat"


@dataclasses.dataclass(frozen=True)
class Disconnected(Message):
    """Delivered by the transport when a connection closes; never sent on the wire."""

    TYPE: ClassVar[str] = "disconnected"


@dataclasses.dataclass(frozen=True)
class Refused(Message):
    """Delivered by the controller's transport for a line it dropped; never on the wire."""

    TYPE: ClassVar[str] = "refused"
    reason: str
    peer: str


AGENT_MESSAGES: tuple[type[Message], ...] = (
    Hello,
    Beat,
    VerdictReport,
    GpuUsage,
    Started,
    Progress,
    Result,
    WorkerEvent,
    StacksReport,
    Exit,
)
"""What an agent may send its controller."""
CONTROLLER_MESSAGES: tuple[type[Message], ...] = (
    Beat,
    Launch,
    Stop,
    Probe,
    WarmUp,
    DumpStacks,
    Shutdown,
)
"""What a controller may send its agents."""
WORKER_MESSAGES: tuple[type[Message], ...] = (WorkerProgress, Result, WorkerEvent)
"""What a worker may send its agent."""
ATTEMPT_MESSAGES: tuple[type[Message], ...] = (Started, Progress, Result, WorkerEvent, Exit)
"""Agent messages about one attempt: the controller drops those of an earlier attempt."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A controller <-> agent message with what every line carries besides its fields."""

    message: Message
    node: str
    attempt: int | None = None
    """The attempt the sender was in (agent -> controller); None between attempts."""
    time: float = 0.0


_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _adapter(cls: type[Message]) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(cls.__qualname__)
    if adapter is None:
        # Imported on first use: processes that only import this module stay light.
        from pydantic import TypeAdapter

        adapter = _ADAPTERS[cls.__qualname__] = TypeAdapter(cls)
    return adapter


def _encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), default=str).encode()


def _body(message: Message) -> dict[str, Any]:
    return {"type": message.TYPE, **dataclasses.asdict(message)}


def _decode(raw: bytes, token: str) -> dict[str, Any]:
    try:
        fields = json.loads(raw)
    except ValueError as bad:
        raise ProtocolError(f"not JSON: {bad}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"not a JSON object: {type(fields).__name__}")
    if fields.pop("token", None) != token:
        raise ProtocolError("missing or wrong token")
    return fields


def _typed(fields: dict[str, Any], allowed: tuple[type[Message], ...]) -> Message:
    kind = fields.pop("type", None)
    cls = next((c for c in allowed if kind == c.TYPE), None)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    from pydantic import ValidationError

    known = {f.name for f in dataclasses.fields(cls)}
    adapter = _adapter(cls)
    try:
        message: Message = adapter.validate_python({k: v for k, v in fields.items() if k in known})
    except ValidationError as bad:
        raise ProtocolError(f"{kind}: {first_problem(bad)}") from None
    return message


def encode_line(envelope: Envelope, token: str) -> bytes:
    """One controller <-> agent line (newline-terminated)."""
    fields = _body(envelope.message)
    fields.update(node=envelope.node, attempt=envelope.attempt, time=envelope.time, token=token)
    return _encode(fields) + b"\n"


def _envelope_fields(node: Any, attempt: Any, sent: Any) -> tuple[str, int | None, float]:
    """A line's node, attempt and time; raises `ProtocolError` unless they fit."""
    if not isinstance(node, str) or not node:
        raise ProtocolError("missing node")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
        raise ProtocolError(f"attempt: expected an integer, got {attempt!r}")
    if isinstance(sent, bool) or not isinstance(sent, int | float):
        raise ProtocolError(f"time: expected a number, got {sent!r}")
    return node, attempt, float(sent)


def decode_line(raw: bytes, token: str, allowed: tuple[type[Message], ...]) -> Envelope:
    """Parse one line; raises `ProtocolError` unless it is an `allowed` message with `token`."""
    fields = _decode(raw, token)
    node, attempt, sent = _envelope_fields(
        fields.pop("node", None), fields.pop("attempt", None), fields.pop("time", 0)
    )
    return Envelope(_typed(fields, allowed), node, attempt, sent)


@dataclasses.dataclass(frozen=True)
class _ProgressLine:
    """A `Progress` line's fields as `encode_line` writes them (`decode_progress`); the
    envelope's are checked afterwards exactly as `decode_line` checks them."""

    ranks: dict[str, Heartbeat]
    type: Any = None
    node: Any = None
    attempt: Any = None
    time: Any = 0
    token: Any = None


_PROGRESS_LINE: list[TypeAdapter[_ProgressLine]] = []


def decode_progress(raw: bytes, token: str) -> Envelope | None:
    """A `Progress` line with `token` decoded in one pass — pydantic's JSON parser straight
    into the message: 13 us for a node of 8 ranks where `decode_line` (`json.loads`, then
    validation of the dicts it built) takes 40, and a controller of 1,024 nodes reads 512 a
    second — or None when `raw` is not one (then `decode_line` says what is wrong with it).
    What it returns is what `decode_line` returns for the same line."""
    from pydantic import ValidationError

    if not _PROGRESS_LINE:
        from pydantic import TypeAdapter

        _PROGRESS_LINE.append(TypeAdapter(_ProgressLine))
    try:
        line = _PROGRESS_LINE[0].validate_json(raw)
    except ValidationError:
        return None
    if line.type != Progress.TYPE or line.token != token:
        return None
    try:
        node, attempt, sent = _envelope_fields(line.node, line.attempt, line.time)
    except ProtocolError:
        return None
    return Envelope(Progress(line.ranks), node, attempt, sent)


def encode_datagram(message: Message, token: str) -> bytes:
    """One worker -> agent datagram."""
    return _encode({**_body(message), "token": token})


def decode_datagram(raw: bytes, token: str) -> Message:
    """Parse one worker datagram; raises `ProtocolError` as `decode_line` does."""
    return _typed(_decode(raw, token), WORKER_MESSAGES)


__all__ = ["STACK_DUMP_SIGNAL", "Env", "unix_address"]  # re-exported from trainctl.env
