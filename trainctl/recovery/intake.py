"""Intake: each message from the node agents -> the record, the journal, and observations.

`Intake.take(envelope)` handles one typed message (`trainctl.protocol`) and returns what the
policy must see of it (`policy.Observation`s: an exit, a lost node, an UNHEALTHY verdict).
Everything else a message carries — progress, results, worker events, stack dumps, standby
verdicts — is recorded here, through the journal and the attempt's monitor. Messages of an
earlier attempt are dropped; a refused line is recorded as an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from trainctl.events import (
    AgentConnected,
    BadEvent,
    CheckpointCommitted,
    CheckpointRestored,
    ControlRefused,
    EventRefused,
    FirstStep,
    NodeExited,
    NodeStarted,
    NodeVerdictChanged,
    ResultReported,
    SpareLost,
    VerdictUnreadable,
    make_data,
)
from trainctl.health.liveness import Silent
from trainctl.health.verdict import NodeVerdictRecord, Verdict
from trainctl.protocol import (
    ATTEMPT_MESSAGES,
    Disconnected,
    Envelope,
    Exit,
    GpuUsage,
    Hello,
    Probe,
    Progress,
    Refused,
    Result,
    StacksReport,
    Started,
    VerdictReport,
    WarmUp,
    WorkerEvent,
)
from trainctl.recovery import placement, policy
from trainctl.recovery.faults import NoFaults
from trainctl.recovery.fleet import Fleet
from trainctl.recovery.fold import routine_exit
from trainctl.recovery.gpu_recorder import GpuRecorder
from trainctl.recovery.journal import Journal
from trainctl.recovery.monitor import AttemptMonitor
from trainctl.recovery.progress_recorder import ProgressRecorder
from trainctl.state import AttemptState, NodeState

Exclude = Callable[[tuple[placement.Exclusion, ...]], None]


class Intake:
    def __init__(
        self,
        journal: Journal,
        fleet: Fleet,
        faults: NoFaults,
        exclude: Exclude,
        standby_probe: Callable[[], Probe],
        log_path: Callable[[str], str],
        exclude_s: float,
        max_steps: int | None,
        say: Callable[[str], None],
        gpu: GpuRecorder,
        per_gpu: bool = False,
    ) -> None:
        self.journal = journal
        self.record = journal.record
        self.fleet = fleet
        self.faults = faults
        self.exclude = exclude
        self.standby_probe = standby_probe
        self.log_path = log_path
        self.exclude_s = exclude_s
        self.max_steps = max_steps
        self.say = say
        self.gpu = gpu
        """Where GPU utilisation samples go (the job's GPU time series, idle flags)."""
        self.per_gpu = per_gpu
        """``nproc_per_node: gpu``/``auto``: the nodes' started workers make the world size."""
        self.progress: ProgressRecorder | None = None
        """Where progress reports also go (the live view; None: nowhere)."""
        self.monitor: AttemptMonitor | None = None
        """The running attempt's monitor (None before the first attempt starts)."""
        self._workers: dict[int, dict[str, int]] = {}
        """Per attempt (``nproc_per_node: gpu``), the workers each node reported starting."""

    def take(self, envelope: Envelope) -> list[policy.Observation]:
        """Handle one message; returns the observations it makes for the policy."""
        message, name = envelope.message, envelope.node
        if isinstance(message, Refused):
            self.journal.event(
                ControlRefused(reason=message.reason, peer=message.peer),
                f"control message refused from {message.peer}: {message.reason}",
            )
            return []
        try:
            self.record.node(name)  # a lookup, not a set of every node per message
        except KeyError:
            return []
        latest = self.record.attempts[-1] if self.record.attempts else None
        live = latest is not None and latest.state in (AttemptState.STARTING, AttemptState.RUNNING)
        if isinstance(message, ATTEMPT_MESSAGES) and (
            not live or latest is None or envelope.attempt != latest.number
        ):
            # A late message of an attempt that has ended (between attempts, the next one's
            # record does not exist yet: its view must not start with the last one's exits).
            return []
        in_attempt = name in self.fleet.active
        now = time.time()
        if isinstance(message, Hello):
            self.fleet.connected.add(name)
            # When the agent said it (its clock): a loss noticed before it is an earlier
            # agent's, however late this controller reads the hello.
            self.fleet.hello_at[name] = envelope.time or now
            if message.holder:
                self.fleet.holders[name] = message.holder
            self.journal.node_event(AgentConnected(pid=message.pid), f"{name}: agent up", name)
            if not in_attempt:
                self.fleet.send(name, self.standby_probe())
        elif isinstance(message, Disconnected):
            return self._disconnected(name, in_attempt, now)
        elif isinstance(message, VerdictReport):
            return self._verdict(name, message, in_attempt)
        elif isinstance(message, GpuUsage):
            self.gpu.add(name, envelope.attempt, message.phase, message.sample, now)
        elif isinstance(message, StacksReport):
            if self.monitor is not None:
                self.monitor.stacks(name, message.dumps, message.duration_s)
        elif isinstance(message, Started):
            self._started(name, message)
        elif isinstance(message, Progress):
            self._progress(name, message)
            if self.progress is not None:
                self.progress.add(name, envelope.attempt, message.ranks, now)
        elif isinstance(message, Result):
            self.record.final_step, self.record.fingerprint = (
                message.final_step,
                message.fingerprint,
            )
            self.journal.event(
                ResultReported(final_step=message.final_step, fingerprint=message.fingerprint),
                f"final step {message.final_step}, fingerprint {message.fingerprint[:16]}…",
                node=name,
            )
            self.journal.changed()
        elif isinstance(message, WorkerEvent):
            self._worker_event(name, message)
        elif isinstance(message, Exit):
            return [self._exit(name, message, now)]
        return []

    # -- nodes ---------------------------------------------------------------------------------
    def _disconnected(self, name: str, in_attempt: bool, now: float) -> list[policy.Observation]:
        self.fleet.connected.discard(name)
        node = self.record.node(name)
        if in_attempt and node.exit_code is None:
            return [policy.NodeLost(name, now)]
        if not in_attempt and node.state == NodeState.SPARE:
            node.move(NodeState.FAILED, "agent lost while on standby")
            self.journal.event(SpareLost(), f"{name}: agent lost on standby", node=name)
        return []

    def spare_silent(self, silent: Silent[str]) -> None:
        """A node off the attempt fell silent: excluded, and whatever it runs killed."""
        name = silent.peer
        exclusion = placement.silent_standby(name, silent.reason, time.time(), self.exclude_s)
        self.journal.event(SpareLost(), exclusion.reason, node=name)
        self.exclude((exclusion,))
        self.fleet.kill(name)
        self.journal.save_state()

    def _verdict(
        self, name: str, message: VerdictReport, in_attempt: bool
    ) -> list[policy.Observation]:
        try:
            record = NodeVerdictRecord.from_dict(message.record)
        except ValueError as bad:
            self.journal.event(VerdictUnreadable(), f"{name}: unreadable verdict: {bad}", node=name)
            return []
        if in_attempt and message.phase != "standby":
            unhealthy = self.monitor.verdict(name, record) if self.monitor else None
            return [unhealthy] if unhealthy is not None else []
        self._standby_verdict(name, record)
        return []

    def _standby_verdict(self, name: str, record: NodeVerdictRecord) -> None:
        self.journal.write_node(name, record.to_dict())
        verdict = record.verdict
        detail = "" if verdict.status is Verdict.OK else f": {verdict.reason}"
        self.journal.event(
            NodeVerdictChanged(phase="standby", status=verdict.status.value, reason=verdict.reason),
            f"{name}: {verdict.status.value} (on standby){detail}",
            node=name,
        )
        judgement = placement.judge_standby(
            name,
            verdict.status,
            verdict.reason,
            self.journal.blocklist.get(name),
            time.time(),
            self.exclude_s,
        )
        if judgement.action is placement.StandbyAction.READMIT:
            self.journal.readmit(name, judgement.reason)
        elif judgement.exclusion is not None:
            self.exclude((judgement.exclusion,))
            self.journal.save_state()

    def _started(self, name: str, message: Started) -> None:
        if self.monitor is not None:
            self.monitor.node_started(name)
        self.record.node(name).move(NodeState.RUNNING)
        self.journal.changed()
        attempt = self.record.attempts[-1]
        count = f" with {message.workers} worker(s)" if message.workers else ""
        self.journal.node_event(
            NodeStarted(
                agent_pid=message.pid,
                torchrun_pid=message.torchrun_pid,
                workers=message.workers or None,
            ),
            f"{name}: torchrun started{count}",
            name,
        )
        if message.workers and self.per_gpu:
            # ``nproc_per_node: gpu``: the world is the sum of what each node found.
            started = self._workers.setdefault(attempt.number, {})
            started[name] = message.workers
            attempt.world_size = sum(started.values())
            if self.monitor is not None:  # ranks that never report count as silent
                self.monitor.watch.world_size = attempt.world_size
        if attempt.state == AttemptState.STARTING:
            attempt.move(AttemptState.RUNNING)
        self.faults.reached(0)

    def _exit(self, name: str, message: Exit, now: float) -> policy.NodeExit:
        errors = tuple(e.message for e in message.errors)
        self.record.node(name).exit_code = message.code
        if self.monitor is not None:
            self.monitor.node_exited(name)
        for rank, text in sorted(message.flight_recorders.items()):
            if rank.isdigit():  # a rank number from the agent: one safe path segment
                self.journal.write_job_file(
                    f"stacks/attempt-{self.record.attempts[-1].number}/{name}-rank-{rank}"
                    ".flight_recorder.json",
                    text.encode(),
                )
        how = "was stopped" if message.stopped else f"exited with {message.code}"
        if message.crashes and not message.stopped:
            how += f" ({'; '.join(message.crashes)})"
        data = NodeExited(
            code=message.code,
            errors=list(errors),
            stopped=message.stopped,
            crashes=list(message.crashes),
        )
        if routine_exit(message.code, message.stopped, len(errors), len(message.crashes)):
            # Routine (the controller stopped it, or it finished): every node at once at a
            # relaunch or the job's end, folded past a few (4,096 synced files a relaunch).
            self.journal.node_event(data, f"{name}: torchrun {how}", name)
        else:
            self.journal.event(data, f"{name}: torchrun {how}", node=name)
        return policy.NodeExit(
            name,
            message.code,
            now,
            stopped=message.stopped,
            errors=errors,
            reason=message.reason,
            crashes=message.crashes,
        )

    # -- progress ------------------------------------------------------------------------------
    def _progress(self, name: str, message: Progress) -> None:
        if self.monitor is not None:
            self.monitor.progress(name, message.ranks)
        steps = [beat.step for beat in message.ranks.values()]
        if not steps:
            return
        now = time.time()
        node = self.record.node(name)
        node.step = max(steps)
        self.record.step = max(self.record.step or 0, node.step)
        attempt = self.record.attempts[-1]
        if attempt.first_step is None:
            attempt.first_step, attempt.first_step_at = min(steps), now
            restored = attempt.restored_step or 0
            self.journal.event(
                FirstStep(step=min(steps), restored_step=restored),
                f"attempt {attempt.number}: first step {min(steps)} done"
                + (f" (restored step {restored})" if restored else ""),
                node=name,
            )
            # Training runs: the spares prepare a torchrun for the next attempt now.
            for spare in self.fleet.waiting():
                self.fleet.send(spare, WarmUp(self.log_path(spare)))
        attempt.last_step = max(attempt.last_step or 0, node.step)
        attempt.last_step_at = now
        self.journal.changed()
        self.faults.reached(self.record.step)

    def _worker_event(self, name: str, message: WorkerEvent) -> None:
        fields = {k: v for k, v in message.data.items() if k != "node"}
        fields["rank"] = message.rank
        try:
            data = make_data(message.kind, fields)
        except BadEvent as bad:
            self.journal.event(
                EventRefused(refused_kind=message.kind, problem=str(bad)),
                f"{name}: a worker event did not fit its kind: {bad}",
                node=name,
            )
            return
        attempt = self.record.attempts[-1]
        if isinstance(data, CheckpointCommitted):
            self.record.committed_step = max(self.record.committed_step or 0, data.step)
            self.journal.changed()
        elif isinstance(data, CheckpointRestored):
            attempt.restored_step = data.step
            self.journal.changed()
        self.journal.event(data, message.message, node=name, kind=message.kind)
