"""The controller loop: start an attempt, observe it, ask the policy, act, record everything.

The controller hosts the rendezvous store (so losing any node, node-0 included, never takes the
store with it) and the control channel the node agents report on. Every state change goes to
the job store (state.json replaced atomically, one object per event), so `trainctl status`
works from any shell with no server running.

Health: agents report ``verdict`` messages (preflight and periodic probes); the controller
writes each node's latest one to ``nodes/<node>.json`` and turns UNHEALTHY into a node-fault
observation. From ``progress`` messages it watches for hangs (then asks every agent to dump
its workers' stacks into ``stacks/attempt-<n>/<node>-rank-<r>.txt`` before declaring the
attempt hung) and stragglers (a DEGRADED verdict merged into the node's record).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainctl.exitcodes import ExitCode
from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict, worst_of
from trainctl.launch.control import ControlServer
from trainctl.launch.local import LocalScheduler
from trainctl.launch.plan import Facts, LaunchPlan, plan_attempt
from trainctl.recovery import policy
from trainctl.recovery.watch import HangCheck, ProgressWatch
from trainctl.spec import JobSpec
from trainctl.state import (
    AttemptRecord,
    AttemptState,
    Event,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
)
from trainctl.store import JobStore

STATE_WRITE_INTERVAL_S = 1.0
"""Progress-only changes are written to state.json at most this often."""
STRAGGLER_CHECK_INTERVAL_S = 1.0
"""Straggler detection runs at most this often (and only when new step times arrived)."""


@dataclasses.dataclass
class PendingHang:
    """A detected hang waiting for the agents' stack dumps before it is declared."""

    check: HangCheck
    detected_at: float
    """Wall-clock time of detection."""
    deadline: float
    """Monotonic time after which the hang is declared with whatever stacks arrived."""
    awaiting: set[str]
    states: dict[int, str | None] = dataclasses.field(default_factory=dict)
    """rank -> /proc state letter, from the dumps."""
    declared: bool = False


def start_rendezvous_store(host: str) -> tuple[Any, int]:
    """Host the c10d rendezvous TCPStore on an OS-chosen port. Returns (store, port)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    return store, int(store.port)


@dataclasses.dataclass
class ControllerOptions:
    python: str = sys.executable
    rdzv_host: str = "127.0.0.1"
    on_message: Callable[[str], None] = lambda message: None
    """Where human progress lines go (the CLI passes its console)."""


class Controller:
    def __init__(
        self,
        spec: JobSpec,
        store: JobStore,
        record: JobRecord,
        options: ControllerOptions,
        scheduler: LocalScheduler | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.record = record
        self.options = options
        self.scheduler = scheduler or LocalScheduler(options.python)
        self.stop_signal: str | None = None
        self._last_state_write = 0.0
        self._dirty = False
        self._last_announced_step = 0
        self.watch: ProgressWatch | None = None
        self._probes: dict[str, NodeVerdictRecord] = {}
        self._stragglers: dict[str, HealthVerdict] = {}
        self._hang: PendingHang | None = None
        self._last_straggler_check = 0.0

    # -- recording ---------------------------------------------------------------------------
    def event(self, kind: str, message: str, /, node: str | None = None, **data: Any) -> None:
        attempt = self.record.attempts[-1].number if self.record.attempts else None
        self.store.append_event(
            self.record.job_id,
            Event(
                time=time.time(), kind=kind, message=message, node=node, attempt=attempt, data=data
            ),
        )

    def save_state(self, force: bool = True) -> None:
        now = time.monotonic()
        if force or (self._dirty and now - self._last_state_write >= STATE_WRITE_INTERVAL_S):
            self.store.write_state(self.record)
            self._last_state_write = now
            self._dirty = False

    def say(self, message: str) -> None:
        self.options.on_message(message)

    # -- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, on_signal)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Run the job to an end; returns the exit code for the scheduler."""
        from trainctl.launch import proctree

        proctree.become_subreaper()
        self.record.controller_pid = os.getpid()
        server = ControlServer(self.options.rdzv_host, 0)
        rdzv_store, rdzv_port = start_rendezvous_store(self.options.rdzv_host)
        try:
            return self._run_attempt(server, rdzv_port)
        finally:
            server.close()
            del rdzv_store
            self.store.upload_logs(self.record.job_id)

    def _facts(self, rdzv_port: int, control_endpoint: str) -> Facts:
        run_dir = str(self.store.local_job_dir(self.record.job_id))
        return Facts(
            python=self.options.python,
            storage_root=self.store.root,
            run_dir=run_dir,
            rdzv_host=self.options.rdzv_host,
            rdzv_port=rdzv_port,
            control_endpoint=control_endpoint,
            checkpoint_root=self.store.checkpoint_root(
                self.record.job_id, self.spec.checkpoint.storage
            ),
        )

    def _start_attempt(self, server: ControlServer, rdzv_port: int) -> LaunchPlan:
        number = len(self.record.attempts)
        names = tuple(n.name for n in self.record.nodes if n.state != NodeState.EXCLUDED)
        names = names[: self.spec.nodes]
        facts = self._facts(rdzv_port, server.endpoint)
        plan = plan_attempt(self.spec, facts, self.record.job_id, number, names)
        plan_path = Path(facts.run_dir) / f"attempt-{number}" / "plan.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan.to_json(), indent=1))
        attempt = AttemptRecord(
            number=number, started_at=time.time(), world_size=plan.world_size, nodes=list(names)
        )
        self.record.attempts.append(attempt)
        self.record.move(JobState.RUNNING, f"attempt {number} on {len(names)} node(s)")
        for node_plan in plan.nodes:
            pid = self.scheduler.start_node(str(plan_path), plan, node_plan, server.endpoint)
            node = self.record.node(node_plan.name)
            node.pid = pid
            node.move(NodeState.STARTING)
        self.save_state()
        self.event(
            "attempt_started",
            f"attempt {number}: {', '.join(names)}, world size {plan.world_size}",
            nodes=list(names),
            world_size=plan.world_size,
            rdzv=plan.rdzv_endpoint,
        )
        self.say(f"attempt {number}: {len(names)} node(s), world size {plan.world_size}")
        return plan

    def _handle_message(
        self, node_name: str, message: dict[str, Any], observations: list[policy.Observation]
    ) -> None:
        kind = message.get("type")
        now = time.time()
        try:
            node = self.record.node(node_name)
        except KeyError:
            return
        if kind == "started" and self.watch is not None:
            self.watch.node_started(node_name, time.monotonic())
        if kind == "verdict":
            self._on_verdict(node_name, message, observations)
        elif kind == "stacks":
            self._on_stacks(node_name, message)
        elif kind == "started":
            node.move(NodeState.RUNNING)
            self._dirty = True
            self.event(
                "node_started",
                f"{node_name}: torchrun started",
                node=node_name,
                agent_pid=message.get("pid"),
                torchrun_pid=message.get("torchrun_pid"),
            )
            if self.record.attempts[-1].state == AttemptState.STARTING:
                self.record.attempts[-1].move(AttemptState.RUNNING)
        elif kind == "progress":
            ranks = message.get("ranks", {})
            if self.watch is not None:
                self.watch.record(node_name, ranks, time.monotonic())
            steps = [int(r["step"]) for r in ranks.values()]
            if steps:
                node.step = max(steps)
                self.record.step = max(self.record.step or 0, node.step)
                self._dirty = True
                self._announce_progress()
        elif kind == "result":
            self.record.final_step = int(message["final_step"])
            self.record.fingerprint = str(message["fingerprint"])
            self.event(
                "result",
                f"final step {self.record.final_step}, fingerprint {self.record.fingerprint[:16]}…",
                node=node_name,
                final_step=self.record.final_step,
                fingerprint=self.record.fingerprint,
            )
            self._dirty = True
        elif kind == "event":
            data = {**(message.get("data") or {}), "rank": message.get("rank")}
            data.pop("node", None)  # the reporting node is the event's own node
            self.event(
                str(message.get("kind", "worker_event")),
                str(message.get("message", "")),
                node=node_name,
                **data,
            )
        elif kind == "exit":
            code = int(message.get("code", 1))
            errors = tuple(str(e.get("message", "")) for e in message.get("errors", []))
            observations.append(
                policy.NodeExit(
                    node_name, code, now, stopped=bool(message.get("stopped")), errors=errors
                )
            )
            node.exit_code = code
            if self.watch is not None:
                self.watch.node_exited(node_name)
            self.event(
                "node_exited",
                f"{node_name}: torchrun exited with {code}",
                node=node_name,
                code=code,
                errors=list(errors),
                stopped=bool(message.get("stopped")),
            )
        elif kind == "disconnected" and node.exit_code is None:
            observations.append(policy.NodeLost(node_name, now))

    # -- health ------------------------------------------------------------------------------
    def _write_node_health(self, node: str) -> NodeVerdictRecord:
        """Write ``nodes/<node>.json``: the latest probe verdict, merged with a straggler
        verdict while the node is flagged (worst of both, each kept in the evidence)."""
        probe = self._probes[node]
        straggler = self._stragglers.get(node)
        record = probe
        if straggler is not None and straggler.status is not Verdict.OK:
            merged = worst_of({"probe": probe.verdict, "progress": straggler})
            record = NodeVerdictRecord(node, "running", time.time(), merged)
        self.store.write_node(self.record.job_id, node, record.to_dict())
        return record

    def _on_verdict(
        self, node: str, message: dict[str, Any], observations: list[policy.Observation]
    ) -> None:
        try:
            record = NodeVerdictRecord.from_dict(message.get("record") or {})
        except ValueError as bad:
            self.event("verdict_unreadable", f"{node}: unreadable verdict: {bad}", node=node)
            return
        previous = self._probes.get(node)
        if previous is not None and previous.verdict.status is Verdict.UNHEALTHY:
            # UNHEALTHY sticks for the attempt: an XID is an event, delivered once, so the
            # next probe of the same broken GPU looks clean.
            return
        self._probes[node] = record
        self._write_node_health(node)
        verdict = record.verdict
        changed = previous is None or previous.verdict.status is not verdict.status
        if record.phase == "preflight" or changed:
            when = "before joining" if record.phase == "preflight" else "probe while running"
            detail = "" if verdict.status is Verdict.OK else f": {verdict.reason}"
            self.event(
                "node_verdict",
                f"{node}: {verdict.status.value} ({when}){detail}",
                node=node,
                phase=record.phase,
                status=verdict.status.value,
                reason=verdict.reason,
            )
        if verdict.status is Verdict.UNHEALTHY:
            observations.append(
                policy.NodeUnhealthy(node, record.checked_at, record.phase, verdict.reason)
            )
        elif verdict.status is Verdict.DEGRADED and changed:
            self.say(f"{node} degraded: {verdict.reason}")

    def _check_stragglers(self) -> None:
        watch = self.watch
        now = time.monotonic()
        if watch is None or not watch.has_new_samples():
            return
        if now - self._last_straggler_check < STRAGGLER_CHECK_INTERVAL_S:
            return
        self._last_straggler_check = now
        for node, verdict in watch.check_stragglers().items():
            previous = self._stragglers.get(node)
            self._stragglers[node] = verdict
            was_flagged = previous is not None and previous.status is not Verdict.OK
            flagged = verdict.status is not Verdict.OK
            if flagged == was_flagged:
                continue
            if node in self._probes:
                self._write_node_health(node)
            if flagged:
                self.event("straggler", f"{node}: {verdict.reason}", node=node, **verdict.evidence)
                self.say(f"{node} degraded: {verdict.reason}")
            else:
                self.event(
                    "straggler_cleared", f"{node}: {verdict.reason}", node=node, **verdict.evidence
                )

    def _check_hang(self, plan: LaunchPlan, server: ControlServer) -> None:
        """Detect a hang once per attempt and ask every running agent for stack dumps."""
        if self.watch is None or self._hang is not None:
            return
        check = self.watch.check_hang(time.monotonic())
        if check is None:
            return
        now = time.time()
        silent = ", ".join(
            f"rank {h.member} ({self.watch.node_of(h.member) or 'node unknown'}) {h.silent_s:.1f} s"
            for h in check.hung
        )
        self.event(
            "hang_detected",
            f"no progress within the hang timeout: {silent}; {check.timeout.explanation}; "
            "dumping the stacks of every rank",
            timeout_s=check.timeout.timeout_s,
            explanation=check.timeout.explanation,
            ranks=[
                {
                    "rank": h.member,
                    "node": self.watch.node_of(h.member),
                    "step": self.watch.step_of(h.member),
                    "silent_s": h.silent_s,
                }
                for h in check.hung
            ],
        )
        self.say(f"hang detected ({check.timeout.explanation}): dumping stacks")
        awaiting = {
            n.name
            for n in plan.nodes
            if n.name not in self.watch.exited
            and server.send(n.name, {"type": "dump_stacks", "reason": "hang"})
        }
        deadline = time.monotonic() + self.spec.health.stack_dump_timeout_s
        self._hang = PendingHang(check, now, deadline, awaiting)

    def _on_stacks(self, node: str, message: dict[str, Any]) -> None:
        hang = self._hang
        attempt = self.record.attempts[-1].number
        directory = f"stacks/attempt-{attempt}"
        saved = []
        for dump in message.get("dumps", []):
            rank = int(dump["rank"])
            header = (
                f"# rank {rank} (local rank {dump.get('local_rank')}) on {node}, "
                f"pid {dump.get('pid')}, process state {dump.get('state')}\n"
                f"# method: {dump.get('method') or 'none succeeded'}\n"
            )
            for failure in dump.get("failures", []):
                header += f"# failed: {failure}\n"
            body = dump.get("text") or "(no stacks could be read)\n"
            self.store.write_job_file(
                self.record.job_id,
                f"{directory}/{node}-rank-{rank}.txt",
                (header + "\n" + body).encode(),
            )
            saved.append(
                f"rank {rank}: {dump.get('method') or 'no dump'}, state {dump.get('state')}"
            )
            if hang is not None:
                hang.states[rank] = dump.get("state")
        self.event(
            "stacks_saved",
            f"{node}: {'; '.join(saved) or 'no worker processes found'}",
            node=node,
            dumps=[{k: v for k, v in d.items() if k != "text"} for d in message.get("dumps", [])],
            duration_s=message.get("duration_s"),
        )
        if hang is not None:
            hang.awaiting.discard(node)

    def _declare_hang(self, observations: list[policy.Observation]) -> None:
        """Once every agent answered (or the deadline passed), observe the hang."""
        hang, watch = self._hang, self.watch
        if hang is None or watch is None or hang.declared:
            return
        if hang.awaiting and time.monotonic() < hang.deadline:
            return
        ranks = tuple(
            policy.SilentRank(
                rank=h.member,
                node=watch.node_of(h.member),
                step=watch.step_of(h.member),
                silent_s=h.silent_s,
                process_state=hang.states.get(h.member),
            )
            for h in hang.check.hung
        )
        timeout = hang.check.timeout
        observations.append(
            policy.Hang(hang.detected_at, timeout.timeout_s, timeout.explanation, ranks)
        )
        hang.declared = True

    def _announce_progress(self) -> None:
        step = self.record.step or 0
        total = self.spec.max_steps
        every = max(1, (total or 100) // 5)
        if step >= self._last_announced_step + every:
            self._last_announced_step = step - step % every
            self.say(f"step {step}" + (f"/{total}" if total else ""))

    def _check_agents(self, plan: LaunchPlan, observations: list[policy.Observation]) -> None:
        """An agent process that exited without reporting is a lost node."""
        for node_plan in plan.nodes:
            node = self.record.node(node_plan.name)
            if (
                node.exit_code is None
                and self.scheduler.agent_exit_code(node_plan.name) is not None
            ):
                observations.append(policy.NodeLost(node_plan.name, time.time()))

    def _run_attempt(self, server: ControlServer, rdzv_port: int) -> ExitCode:
        plan = self._start_attempt(server, rdzv_port)
        view = policy.AttemptView(nodes=tuple(n.name for n in plan.nodes))
        self.watch = ProgressWatch(
            self.spec.health, view.nodes, plan.world_size, self.spec.max_steps
        )
        while True:
            observations: list[policy.Observation] = []
            try:
                node_name, message = server.messages.get(timeout=0.1)
                self._handle_message(node_name, message, observations)
                while True:
                    node_name, message = server.messages.get_nowait()
                    self._handle_message(node_name, message, observations)
            except queue.Empty:
                pass
            self._check_agents(plan, observations)
            self._check_stragglers()
            self._check_hang(plan, server)
            self._declare_hang(observations)
            if self.stop_signal is not None:
                observations.append(policy.StopRequested(self.stop_signal, time.time()))
            view = policy.observe(view, observations)
            decision = policy.decide(time.time(), view)
            if decision.action == policy.Action.CONTINUE:
                self.save_state(force=False)
                continue
            return self._finish(plan, server, view, decision)

    def _finish(
        self,
        plan: LaunchPlan,
        server: ControlServer,
        view: policy.AttemptView,
        decision: policy.Decision,
    ) -> ExitCode:
        attempt = self.record.attempts[-1]
        grace = self.spec.launch.stop_grace_s
        if decision.action != policy.Action.SUCCEED:
            for node_plan in plan.nodes:
                server.send(node_plan.name, {"type": "stop", "reason": decision.reason})
            self.say(f"stopping: {decision.reason}")
        # Agents exit by themselves once torchrun ends or after a stop (grace + margin).
        self.scheduler.wait_agents(grace + 3.0)
        # Record what arrived after the decision (a node's preflight verdict, its exit); the
        # observations no longer change the outcome.
        late: list[policy.Observation] = []
        while True:
            try:
                node_name, message = server.messages.get_nowait()
            except queue.Empty:
                break
            self._handle_message(node_name, message, late)
        leftovers = self.scheduler.stop_all(self.record.job_id, grace_s=1.0)
        if leftovers:
            self.event("cleanup", f"killed {len(leftovers)} leftover process(es)", pids=leftovers)
        exits = {e.node: e for e in view.exits}
        for node_plan in plan.nodes:
            node = self.record.node(node_plan.name)
            node.pid = None
            if decision.action == policy.Action.SUCCEED:
                node.move(NodeState.SUCCEEDED)
            elif decision.action == policy.Action.STOP:
                node.move(NodeState.STOPPED, decision.reason)
            elif node_plan.name == decision.blamed:
                node.move(NodeState.FAILED, decision.reason)
            elif (
                node_plan.name in exits
                and exits[node_plan.name].code != 0
                and not (exits[node_plan.name].stopped)
            ):
                node.move(NodeState.FAILED, policy.describe_exit(exits[node_plan.name]))
            else:
                node.move(NodeState.STOPPED, "stopped after another node failed")
        exit_code = decision.exit_code if decision.exit_code is not None else ExitCode.FAILED
        attempt.ended_at = time.time()
        attempt.exit_code = int(exit_code)
        if decision.action == policy.Action.SUCCEED:
            attempt.move(AttemptState.SUCCEEDED, decision.reason)
            self.record.move(JobState.SUCCEEDED, decision.reason)
        elif decision.action == policy.Action.STOP:
            attempt.move(AttemptState.STOPPED, decision.reason)
            self.record.move(JobState.STOPPED, decision.reason)
        else:
            attempt.move(AttemptState.FAILED, decision.reason)
            self.record.move(JobState.FAILED, decision.reason)
        self.record.exit_code = int(exit_code)
        self.save_state()
        self.event(
            f"job_{self.record.state.value}",
            decision.reason,
            exit_code=int(exit_code),
            blamed=decision.blamed,
        )
        return exit_code


def new_record(job_id: str, spec: JobSpec, now: float) -> JobRecord:
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
