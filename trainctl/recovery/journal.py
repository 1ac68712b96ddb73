"""The journal: everything the controller (and `trainctl resume`) records about a job.

The one writer of a running job's record (``state.json`` and its pieces), typed events,
blocklist, node verdicts, stack dumps and GPU time series. It holds the `JobRecord` and the
blocklist, makes the record's state moves with their events (an attempt's start and end, the
job's end, exclusions), and scrubs every message it stores of the job's secret values. While
`writable()` says no (the controller lost its lease: another controller owns the job now),
it writes nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from trainctl.cancel import CancelRequest
from trainctl.events import (
    AttemptEnded,
    AttemptStarted,
    Event,
    EventData,
    JobCancelled,
    JobFailed,
    JobGaveUp,
    JobResumed,
    JobStopped,
    JobSucceeded,
    NodeEvents,
    NodeExcluded,
    NodeReadmitted,
)
from trainctl.exitcodes import ExitCode
from trainctl.recovery.fold import Folder, Held
from trainctl.recovery.placement import Blocklist, Exclusion, NodeSelection
from trainctl.secrets import Redactor
from trainctl.spec import JobSpec
from trainctl.state import (
    AttemptRecord,
    AttemptState,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
)
from trainctl.store import JobStore

STATE_WRITE_INTERVAL_S = 1.0
"""Progress-only changes are written to the store at most this often, at any size: such a
write is ``state.json`` and the running attempt's record, both O(1) (`trainctl.state_pieces`;
while ``state.json`` held every node, it grew with N and this slowed to N/256 s)."""

FOLDED_LABEL = {
    "agent_connected": "agent up",
    "node_started": "torchrun started",
    "node_exited": "torchrun ended (stopped or finished)",
}
"""What a fold of each kind says its nodes did (a verdict fold says its status)."""


CONTROLLER_LOST = "controller_lost"
"""The outcome and cause of an attempt whose controller went away without ending it."""

_JOB_END = {
    JobState.SUCCEEDED: JobSucceeded,
    JobState.FAILED: JobFailed,
    JobState.STOPPED: JobStopped,
    JobState.CANCELLED: JobCancelled,
}


class Journal:
    def __init__(
        self,
        store: JobStore,
        record: JobRecord,
        redactor: Redactor | None = None,
        writable: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.record = record
        self.redactor = redactor or Redactor([])
        self.writable = writable
        self.blocklist: dict[str, Exclusion] = {}
        self._dirty = False
        self._state_writer = store.state_writer(record.job_id)
        self._last_state_write = 0.0
        self._state_interval_s = STATE_WRITE_INTERVAL_S
        self._folder = Folder()
        self.node_documents: dict[str, dict[str, Any]] = {}
        """Each node's latest ``nodes/<node>.json`` document written here (the live view)."""
        self.on_event: Callable[[Event], None] | None = None
        """Called with every event stored (the controller's live view, when it keeps one)."""

    @property
    def job_id(self) -> str:
        return self.record.job_id

    # -- writing -----------------------------------------------------------------------------
    def event(
        self, data: EventData, message: str, node: str | None = None, kind: str | None = None
    ) -> None:
        """Record one event of the current attempt (secret values scrubbed). `kind` names an
        event whose type this release does not know (a worker's own)."""
        if not self.writable():
            return
        attempt = self.record.attempts[-1].number if self.record.attempts else None
        self._write(time.time(), data, message, node, attempt, kind or data.KIND)

    def _write(
        self,
        when: float,
        data: EventData,
        message: str,
        node: str | None,
        attempt: int | None,
        kind: str,
    ) -> None:
        if self.redactor:
            data = type(data).model_validate(self.redactor.data(data.model_dump()))
            message = self.redactor.text(message)
        event = Event(when, message, data, node, attempt, kind)
        self.store.append_event(self.job_id, event)
        if self.on_event is not None:
            self.on_event(event)

    def node_event(self, data: EventData, message: str, node: str) -> None:
        """Record a routine per-node event (agent up, an OK verdict, torchrun started): on its
        own while few of its kind come, else folded with the others of its window into one
        `NodeEvents` (`trainctl.recovery.fold`; written by `flush_folds`)."""
        if not self.writable():
            return
        if self._folder.admit(data.KIND, time.monotonic()):
            self.event(data, message, node=node)
            return
        attempt = self.record.attempts[-1].number if self.record.attempts else None
        self._folder.hold(data.KIND, Held(time.time(), node, attempt, data.model_dump()))

    def flush_folds(self, every: bool = False) -> None:
        """Write the folds whose window is over (`every`: all held events, e.g. before an
        attempt's end is recorded or the controller stops)."""
        for kind, held in self._folder.due(time.monotonic(), every):
            by_attempt: dict[int | None, list[Held]] = {}
            for one in held:
                by_attempt.setdefault(one.attempt, []).append(one)
            for attempt, group in by_attempt.items():
                self._write_fold(kind, attempt, group)

    def _write_fold(self, kind: str, attempt: int | None, held: list[Held]) -> None:
        if not self.writable():
            return
        nodes = [one.node for one in held]
        statuses = {one.data.get("status") for one in held}
        label = FOLDED_LABEL.get(kind) or "/".join(sorted(str(s) for s in statuses))
        data = NodeEvents(
            of_kind=kind,
            nodes=nodes,
            data={one.node: one.data for one in held},
            until=held[-1].time,
        )
        shown = ", ".join(nodes) if len(nodes) <= 3 else f"{nodes[0]}, …, {nodes[-1]}"
        message = f"{len(nodes)} node(s): {label} ({shown})"
        self._write(held[0].time, data, message, None, attempt, NodeEvents.KIND)

    def changed(self) -> None:
        """The record changed in a way worth writing soon (progress), not at once."""
        self._dirty = True

    def save_state(self, force: bool = True) -> None:
        """Write the record now (`force`), or if it changed and the last write is old: only
        the pieces that changed since the last write, then ``state.json``."""
        now = time.monotonic()
        due = self._dirty and now - self._last_state_write >= self._state_interval_s
        if (force or due) and self.writable():
            self._state_writer.write(self.record, scrub=self.redactor.data)
            self._last_state_write = now
            self._dirty = False

    def write_node(self, node: str, document: dict[str, Any]) -> None:
        if self.writable():
            self.store.write_node(self.job_id, node, document)
            self.node_documents[node] = document

    def write_gpu_chunk(self, rows: list[dict[str, Any]], now: float) -> None:
        """Store a batch of GPU utilisation samples (`JobStore.write_gpu_chunk`)."""
        if self.writable():
            self.store.write_gpu_chunk(self.job_id, rows, now)

    def write_progress_chunk(self, rows: list[dict[str, Any]], now: float) -> None:
        """Store the live progress view (`JobStore.write_progress_chunk`)."""
        if self.writable():
            self.store.write_progress_chunk(self.job_id, rows, now)

    def write_job_file(self, relative: str, data: bytes) -> None:
        if self.writable():
            self.store.write_job_file(self.job_id, relative, data)

    # -- the blocklist -------------------------------------------------------------------------
    def load_blocklist(self) -> Blocklist:
        """Read ``blocklist.json`` (CorruptStoreError if an entry does not fit)."""
        from trainctl.errors import CorruptStoreError

        raw = self.store.read_blocklist(self.job_id)
        try:
            self.blocklist = {node: Exclusion.from_json(node, e) for node, e in raw.items()}
        except ValueError as bad:
            url = f"{self.store.job_url(self.job_id)}/blocklist.json"
            raise CorruptStoreError(url, str(bad)) from None
        return self.blocklist

    def _save_blocklist(self) -> None:
        if self.writable():
            entries = {n: e.to_json() for n, e in sorted(self.blocklist.items())}
            self.store.write_blocklist(self.job_id, entries)

    def exclude(self, exclusion: Exclusion) -> None:
        """Put a node on the blocklist, mark it excluded, record why and until when."""
        self.blocklist[exclusion.node] = exclusion
        self.record.node(exclusion.node).move(NodeState.EXCLUDED, exclusion.reason)
        until = time.strftime("%H:%M:%S", time.localtime(exclusion.expires_at))
        self.event(
            NodeExcluded(
                reason=exclusion.reason, cause=exclusion.cause, expires_at=exclusion.expires_at
            ),
            f"{exclusion.node} excluded until {until}: {exclusion.reason}",
            node=exclusion.node,
        )
        self._save_blocklist()

    def readmit(self, node: str, reason: str) -> None:
        """Take a node whose exclusion expired off the blocklist, back on standby."""
        self.blocklist.pop(node, None)
        self._save_blocklist()
        self.record.node(node).move(NodeState.SPARE, "readmitted after a clean probe")
        self.event(NodeReadmitted(), reason, node=node)
        self.save_state()

    # -- attempts ------------------------------------------------------------------------------
    def start_attempt(
        self,
        selection: NodeSelection,
        world_size: int,
        rdzv: str,
        excluded: list[str],
        restart_count: int | None,
    ) -> AttemptRecord:
        """Record a new attempt on `selection.nodes` and its start event."""
        number = len(self.record.attempts)
        names = list(selection.nodes)
        attempt = AttemptRecord(
            number=number,
            started_at=time.time(),
            world_size=world_size,
            nodes=names,
            scheduler_restart_count=restart_count,
        )
        self.record.attempts.append(attempt)
        self.record.move(JobState.RUNNING, f"attempt {number} on {len(names)} node(s)")
        for name in names:
            node = self.record.node(name)
            node.move(NodeState.STARTING)
            node.exit_code, node.reason = None, ""
        self.save_state()
        extra = f" ({selection.reason})" if selection.reason else ""
        self.event(
            AttemptStarted(
                nodes=names,
                world_size=world_size,
                rdzv=rdzv,
                promoted=list(selection.promoted),
                shrunk=selection.shrunk,
                excluded=excluded,
            ),
            f"attempt {number}: {', '.join(names)}, world size "
            f"{world_size or 'one worker per GPU'}{extra}",
        )
        return attempt

    def end_attempt(
        self,
        outcome: AttemptState,
        reason: str,
        *,
        exit_code: int | None,
        cause: str | None,
        blamed: str | None,
        failed_at: float | None,
        decided_at: float,
        recorded_outcome: str | None = None,
    ) -> None:
        """Close the last attempt with `outcome` and record its end (the one place the
        ``attempt_ended`` event is built: the controller's decisions and `resume` alike)."""
        self.flush_folds(every=True)  # the attempt's own events come before its end
        attempt = self.record.attempts[-1]
        attempt.ended_at = time.time()
        attempt.exit_code = exit_code
        attempt.cause = cause
        attempt.blamed = blamed
        attempt.move(outcome, reason)
        self.save_state()
        shown = recorded_outcome or outcome.value
        self.event(
            AttemptEnded(
                outcome=shown,
                reason=reason,
                cause=cause,
                blamed=blamed,
                first_step=attempt.first_step,
                first_step_at=attempt.first_step_at,
                last_step=attempt.last_step,
                last_step_at=attempt.last_step_at,
                restored_step=attempt.restored_step,
                failed_at=failed_at,
                decided_at=decided_at,
            ),
            f"attempt {attempt.number} {shown}: {reason}",
        )

    def close_interrupted_attempt(self, now: float) -> None:
        """After the controller died: end its attempt as lost and its nodes as failed."""
        attempt = self.record.attempts[-1] if self.record.attempts else None
        if attempt is not None and attempt.state in (AttemptState.STARTING, AttemptState.RUNNING):
            self.end_attempt(
                AttemptState.FAILED,
                "the controller stopped without ending the attempt",
                exit_code=None,
                cause=CONTROLLER_LOST,
                blamed=None,
                failed_at=attempt.last_step_at,
                decided_at=now,
                recorded_outcome=CONTROLLER_LOST,
            )
        for node in self.record.nodes:
            if node.state in (NodeState.STARTING, NodeState.RUNNING):
                node.move(NodeState.FAILED, "controller lost")
            node.pid = None

    def resumed(self) -> None:
        """Record that a new controller picked the job up (`trainctl resume`)."""
        was, pending = self.record.state.value, self.record.state == JobState.PENDING
        if not pending:
            self.record.move(JobState.RECOVERING, "resumed")
        self.save_state()
        self.event(
            JobResumed(committed_step=self.record.committed_step),
            "started by the scheduler"
            if pending
            else f"resumed (was {was}); restoring the newest committed checkpoint",
        )

    # -- the job -------------------------------------------------------------------------------
    def end_job(
        self, state: JobState, reason: str, exit_code: ExitCode, gave_up: bool = False
    ) -> ExitCode:
        self.flush_folds(every=True)
        self.record.move(state, reason)
        self.record.exit_code = int(exit_code)
        self.save_state()
        blamed = self.record.attempts[-1].blamed if self.record.attempts else None
        data = (JobGaveUp if gave_up else _JOB_END[state])(exit_code=int(exit_code), blamed=blamed)
        self.event(data, reason)
        return exit_code

    def cancel_job(self, request: CancelRequest, exit_code: ExitCode) -> ExitCode:
        """End the job as cancelled, saying who asked and why."""
        self.flush_folds(every=True)
        reason = request.describe()
        self.record.move(JobState.CANCELLED, reason)
        self.record.cancel = request.to_json()
        self.record.exit_code = int(exit_code)
        self.save_state()
        self.event(
            JobCancelled(exit_code=int(exit_code), by=request.by, request=request.id), reason
        )
        return exit_code

    def controller_started(self, host: str) -> None:
        self.record.controller_pid = os.getpid()
        self.record.controller_host = host


def new_record(job_id: str, spec: JobSpec, now: float) -> JobRecord:
    """A new job's record: its nodes named node-0.., the spares on standby."""
    nodes = [NodeRecord(name=f"node-{i}") for i in range(spec.nodes + spec.spare_nodes)]
    for spare in nodes[spec.nodes :]:
        spare.state = NodeState.SPARE
    return JobRecord(
        job_id=job_id,
        name=spec.name,
        created_at=now,
        updated_at=now,
        nodes=nodes,
        controller_host=os.uname().nodename,
    )
