"""The controller loop: run attempts, observe them, ask the policy, recover, record everything.

The controller hosts the rendezvous store (so losing any node, node-0 included, never takes the
store with it) and the control channel the node agents report on. Node agents live for the whole
job (spares included, on standby with their health known); each attempt is one torchrun per
node, told to the agents with a ``launch`` message. When an attempt fails, the pure policy
classifies it and blames a node where there is evidence; `policy.plan_recovery` then excludes
the blamed node (``blocklist.json``, with an expiry), promotes a spare or shrinks, and the next
attempt restores the newest committed checkpoint — or the job ends with the exit code the
scheduler acts on (1: requeue; 3: crash loop, give up; 4: preempted).

Every state change goes to the job store (state.json replaced atomically, one object per
event), so `trainctl status` works from any shell with no server running, and `trainctl
resume` can pick the job up after the controller itself died.

Health and progress watching during an attempt (verdicts, stragglers, hangs and their stack
dumps) live in `trainctl.recovery.monitoring`; spares' standby verdicts are handled here.
"""

from __future__ import annotations

import contextlib
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
from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict
from trainctl.launch.control import ControlServer
from trainctl.launch.local import LocalScheduler
from trainctl.launch.plan import Facts, LaunchPlan, agent_env, gate_plan, plan_attempt
from trainctl.launch.scheduler import NodeScheduler
from trainctl.recovery import policy
from trainctl.recovery.faults import FAULTS_DIR_ENV, FaultInjector
from trainctl.recovery.monitoring import AttemptMonitoring, PendingHang
from trainctl.recovery.watch import ProgressWatch
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
AGENT_CONNECT_TIMEOUT_S = 60.0
"""How long a node agent may take to connect before its node counts as lost."""
KILL_WAIT_S = 5.0
"""After a failure, how long survivors get to report their torchrun killed."""
FAILURE_HISTORY = 20
"""Failure signatures remembered for crash-loop detection."""


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


@dataclasses.dataclass
class AttemptOutcome:
    decision: policy.Decision
    view: policy.AttemptView
    failed_at: float | None
    decided_at: float


class Controller(AttemptMonitoring):
    def __init__(
        self,
        spec: JobSpec,
        store: JobStore,
        record: JobRecord,
        options: ControllerOptions,
        scheduler: NodeScheduler | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.record = record
        self.options = options
        self.scheduler: NodeScheduler = scheduler or LocalScheduler(options.python)
        self.stop_signal: str | None = None
        self._last_state_write = 0.0
        self._dirty = False
        self._last_announced_step = 0
        self.watch: ProgressWatch | None = None
        self._probes: dict[str, NodeVerdictRecord] = {}
        self._stragglers: dict[str, HealthVerdict] = {}
        self._hang: PendingHang | None = None
        self._last_straggler_check = 0.0
        self.blocklist: dict[str, policy.Exclusion] = {}
        self.connected: set[str] = set()
        """Nodes whose agent said hello and has not gone away."""
        self.started: dict[str, float] = {}
        """Node -> monotonic time its agent was started."""
        self.plan: LaunchPlan | None = None
        self.server: ControlServer | None = None
        self.rdzv_port = 0
        self.faults: FaultInjector | None = None
        self._failed_at: float | None = None
        self.active_nodes: tuple[str, ...] = ()
        self._last_refill = 0.0
        """The nodes of the attempt being started or running."""

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

    def _save_blocklist(self) -> None:
        self.store.write_blocklist(
            self.record.job_id, {n: e.to_json() for n, e in sorted(self.blocklist.items())}
        )

    # -- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, on_signal)

    # -- the job -----------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Run the job to an end (attempts and recoveries); returns the scheduler's exit code."""
        from trainctl.launch import proctree

        proctree.become_subreaper()
        self.record.controller_pid = os.getpid()
        self.record.controller_host = os.uname().nodename
        self.server = ControlServer(self.options.rdzv_host, 0)
        rdzv_store, self.rdzv_port = start_rendezvous_store(self.options.rdzv_host)
        self.blocklist = {
            n: policy.Exclusion.from_json(e)
            for n, e in self.store.read_blocklist(self.record.job_id).items()
        }
        run_dir = self.store.local_job_dir(self.record.job_id)
        self.faults = (
            FaultInjector(
                self.spec,
                self.record.job_id,
                self.scheduler,
                run_dir / "faults",
                self.record.faults_fired,
            )
            if isinstance(self.scheduler, LocalScheduler) and self.spec.faults
            else None
        )
        try:
            return self._run_job()
        except BaseException as error:
            if not self.record.state.terminal:
                # A bug in trainctl, not in the job: say so in the store, then let it surface.
                with contextlib.suppress(Exception):
                    reason = f"controller error: {type(error).__name__}: {error}"
                    self.record.state, self.record.reason = JobState.FAILED, reason
                    self.record.exit_code = int(ExitCode.FAILED)
                    self.save_state()
                    self.event("job_failed", reason, exit_code=int(ExitCode.FAILED))
            raise
        finally:
            self._shutdown_agents()
            self.server.close()
            (run_dir / "faults" / "storage-outage").unlink(missing_ok=True)
            del rdzv_store
            self.store.upload_logs(self.record.job_id)

    def _facts(self) -> Facts:
        assert self.server is not None
        run_dir = str(self.store.local_job_dir(self.record.job_id))
        return Facts(
            python=self.options.python,
            storage_root=self.store.root,
            run_dir=run_dir,
            rdzv_host=self.options.rdzv_host,
            rdzv_port=self.rdzv_port,
            control_endpoint=self.server.endpoint,
            checkpoint_root=self.store.checkpoint_root(
                self.record.job_id, self.spec.checkpoint.storage
            ),
        )

    def _excluded_now(self) -> set[str]:
        now = time.time()
        return {n for n, e in self.blocklist.items() if e.active(now)}

    def _first_selection(self) -> policy.NodeSelection | None:
        """The nodes of the first attempt of this controller (a fresh job or a resume)."""
        out = self._excluded_now()
        names = [n.name for n in self.record.nodes]
        last = self.record.attempts[-1].nodes if self.record.attempts else names[: self.spec.nodes]
        # (after a Slurm requeue the allocation may hold other nodes than the last attempt)
        preferred = [n for n in last if n in names and n not in out and n not in self.blocklist]
        standby = [n for n in names if n not in last and n not in self.blocklist]
        expired = [n for n in names if n in self.blocklist and n not in out]
        return policy.select_nodes(
            self.spec.nodes, self.spec.fewest_nodes, preferred, standby, expired
        )

    def _budgets(self) -> policy.Budgets:
        return policy.Budgets(
            max_restarts=self.spec.launch.max_restarts,
            per_cause=self.spec.recovery.restarts_per_cause,
            crash_loop_limit=self.spec.recovery.crash_loop_limit,
            exclude_s=self.spec.recovery.exclude_s,
            nodes=self.spec.nodes,
            fewest_nodes=self.spec.fewest_nodes,
        )

    def _run_job(self) -> ExitCode:
        selection = self._first_selection()
        if selection is None:
            return self._end_job(
                JobState.FAILED,
                f"not enough usable nodes: {len(self._excluded_now())} excluded, the job needs "
                f"at least {self.spec.fewest_nodes} (min_nodes)",
                ExitCode.FAILED,
            )
        self._start_agents(self._pool(selection.nodes))
        while True:
            self._mark_spares(selection.nodes)
            outcome = self._run_attempt(selection)
            decision = outcome.decision
            if decision.action == policy.Action.SUCCEED:
                return self._end_job(JobState.SUCCEEDED, decision.reason, ExitCode.FINISHED)
            if decision.action == policy.Action.STOP:
                code = decision.exit_code or ExitCode.FAILED
                return self._end_job(JobState.STOPPED, decision.reason, code)
            if self.stop_signal is not None:
                code = ExitCode.PREEMPTED if self.stop_signal != "SIGINT" else ExitCode.FAILED
                reason = f"stop requested ({self.stop_signal}) while recovering"
                return self._end_job(JobState.STOPPED, reason, code)
            recovery = self._plan_recovery(decision, selection.nodes)
            self._apply_exclusions(recovery.exclude)
            if recovery.action != policy.RecoveryAction.RELAUNCH or recovery.selection is None:
                gave_up = recovery.action == policy.RecoveryAction.GIVE_UP
                return self._end_job(
                    JobState.FAILED,
                    recovery.reason,
                    recovery.exit_code or ExitCode.FAILED,
                    gave_up=gave_up,
                )
            cause = decision.cause.value
            self.record.restarts[cause] = self.record.restarts.get(cause, 0) + 1
            self.record.move(JobState.RECOVERING, recovery.reason)
            selection = recovery.selection
            self.event(
                "recovery",
                recovery.reason,
                action="relaunch",
                cause=cause,
                next_attempt=len(self.record.attempts),
                nodes=list(selection.nodes),
                promoted=list(selection.promoted),
                shrunk=selection.shrunk,
            )
            self.say(recovery.reason)
            self.save_state()
            self._start_agents(selection.nodes)

    def _plan_recovery(self, decision: policy.Decision, nodes: tuple[str, ...]) -> policy.Recovery:
        history = [policy.FailureRecord.from_json(f) for f in self.record.failures]
        recovery = policy.plan_recovery(
            time.time(),
            decision,
            self._budgets(),
            self.record.restarts,
            history,
            self.record.committed_step,
            nodes,
            [n for n in self._standby() if n in self.connected],
            self.blocklist,
        )
        latest = policy.FailureRecord(
            decision.signature or decision.reason, self.record.committed_step
        )
        self.record.failures = [*self.record.failures, latest.to_json()][-FAILURE_HISTORY:]
        return recovery

    def _apply_exclusions(self, exclusions: tuple[policy.Exclusion, ...]) -> None:
        for exclusion in exclusions:
            self.blocklist[exclusion.node] = exclusion
            node = self.record.node(exclusion.node)
            node.move(NodeState.EXCLUDED, exclusion.reason)
            until = time.strftime("%H:%M:%S", time.localtime(exclusion.expires_at))
            self.event(
                "node_excluded",
                f"{exclusion.node} excluded until {until}: {exclusion.reason}",
                node=exclusion.node,
                reason=exclusion.reason,
                cause=exclusion.cause,
                expires_at=exclusion.expires_at,
            )
            self.say(f"{exclusion.node} excluded: {exclusion.reason}")
            self._stop_agent(exclusion.node, "excluded")
        if exclusions:
            self._save_blocklist()

    # -- agents ------------------------------------------------------------------------------
    def _pool(self, active: tuple[str, ...]) -> list[str]:
        """The attempt's nodes plus the spares that should wait on standby."""
        out = self._excluded_now()
        spares = [n for n in self._standby(active) if n not in out][: self.spec.spare_nodes]
        return [*active, *spares]

    def _standby(self, active: tuple[str, ...] | None = None) -> list[str]:
        """Nodes that are neither in the (current) attempt nor excluded."""
        if active is None:
            active = self.active_nodes
        out = self._excluded_now()
        return [n.name for n in self.record.nodes if n.name not in active and n.name not in out]

    def _mark_spares(self, active: tuple[str, ...]) -> None:
        for node in self.record.nodes:
            waiting = node.name in self.connected or node.name in self.started
            keep = node.state in (NodeState.EXCLUDED, NodeState.SPARE)
            if node.name not in active and not keep and waiting:
                node.move(NodeState.SPARE, "on standby")

    def _start_agents(self, nodes: list[str] | tuple[str, ...]) -> None:
        facts = self._facts()
        for name in nodes:
            if name in self.connected or self.scheduler.agent_running(name):
                continue
            log_path = f"{facts.run_dir}/logs/{name}.log"
            env = agent_env(self.spec, facts, self.record.job_id, name)
            env["TRAINCTL_AGENT_LOG"] = log_path
            if any(f.kind == "storage-outage" for f in self.spec.faults):
                env[FAULTS_DIR_ENV] = f"{facts.run_dir}/faults"
            pid = self.scheduler.start_agent(name, env, log_path, facts.control_endpoint)
            self.record.node(name).pid = pid
            self.started[name] = time.monotonic()

    def _refill_spares(self) -> None:
        """Keep the standby pool full: a node whose exclusion expired gets its agent back and
        a standby probe; a clean verdict readmits it (`_on_standby_verdict`)."""
        now = time.monotonic()
        if now - self._last_refill < 1.0:
            return
        self._last_refill = now
        waiting = [n for n in self._standby() if n in self.connected or self._agent_up(n)]
        wanted = self.spec.spare_nodes - len(waiting)
        expired = [
            n
            for n, e in sorted(self.blocklist.items())
            if not e.active(time.time()) and not self._agent_up(n) and n not in self.active_nodes
        ]
        if wanted > 0 and expired:
            self.event(
                "node_reprobe",
                f"{expired[0]}: exclusion expired; probing it before letting it back",
                node=expired[0],
            )
            self._start_agents(expired[:wanted])

    def _agent_up(self, name: str) -> bool:
        return name in self.connected or self.scheduler.agent_running(name)

    def _stop_agent(self, name: str, reason: str) -> None:
        assert self.server is not None
        self.server.send(name, {"type": "shutdown", "reason": reason})
        self.connected.discard(name)

    def _shutdown_agents(self) -> None:
        assert self.server is not None
        for name in list(self.connected):
            self.server.send(name, {"type": "shutdown", "reason": "job ended"})
        self.scheduler.wait_agents(5.0)
        leftovers = self.scheduler.stop_all(self.record.job_id, grace_s=1.0)
        if leftovers:
            self.event("cleanup", f"killed {len(leftovers)} leftover process(es)", pids=leftovers)
        self.connected.clear()

    def _wait_for_agents(
        self, nodes: tuple[str, ...], observations: list[policy.Observation]
    ) -> None:
        """Block until every node of the attempt said hello (or its agent is gone)."""
        assert self.server is not None
        deadline = time.monotonic() + AGENT_CONNECT_TIMEOUT_S
        while not all(n in self.connected for n in nodes):
            self._pump(0.05, observations)
            for name in nodes:
                if name in self.connected:
                    continue
                if self.scheduler.agent_exit_code(name) is not None or time.monotonic() > deadline:
                    observations.append(policy.NodeLost(name, time.time()))
                    return
            if self.stop_signal is not None:
                return

    # -- one attempt -------------------------------------------------------------------------
    def _start_attempt(self, selection: policy.NodeSelection) -> LaunchPlan:
        number = len(self.record.attempts)
        names = selection.nodes
        facts = self._facts()
        out = sorted(self._excluded_now())
        plan = plan_attempt(
            self.spec,
            facts,
            self.record.job_id,
            number,
            names,
            excluded=tuple(out),
            spares=tuple(self._standby(names)),
        )
        plan_path = Path(facts.run_dir) / f"attempt-{number}" / "plan.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan.to_json(), indent=1))
        restart_count = os.environ.get("SLURM_RESTART_COUNT")
        attempt = AttemptRecord(
            number=number,
            started_at=time.time(),
            world_size=plan.world_size,
            nodes=list(names),
            scheduler_restart_count=int(restart_count) if restart_count else None,
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
            "attempt_started",
            f"attempt {number}: {', '.join(names)}, world size {plan.world_size}{extra}",
            nodes=list(names),
            world_size=plan.world_size,
            rdzv=plan.rdzv_endpoint,
            promoted=list(selection.promoted),
            shrunk=selection.shrunk,
            excluded=out,
        )
        self.say(f"attempt {number}: {len(names)} node(s), world size {plan.world_size}{extra}")
        self.plan = plan
        return plan

    def _run_attempt(self, selection: policy.NodeSelection) -> AttemptOutcome:
        assert self.server is not None
        early: list[policy.Observation] = []
        self.active_nodes = selection.nodes
        self._wait_for_agents(selection.nodes, early)
        plan = self._start_attempt(selection)
        self.watch = ProgressWatch(
            self.spec.health, selection.nodes, plan.world_size, self.spec.max_steps
        )
        self._probes, self._stragglers, self._hang = {}, {}, None
        self._failed_at = None
        view = policy.observe(policy.AttemptView(nodes=selection.nodes), early)
        plan_path = Path(self._facts().run_dir) / f"attempt-{plan.attempt}" / "plan.json"
        for name in selection.nodes:
            if name in self.connected:
                self.server.send(name, {"type": "launch", "plan": str(plan_path)})
        while True:
            observations: list[policy.Observation] = []
            self._pump(0.1, observations)
            self._check_agents(plan, view, observations)
            self._check_stragglers()
            self._check_hang(plan, self.server)
            self._declare_hang(observations)
            if self.faults is not None:
                self.faults.tick()
            self._refill_spares()
            if self.stop_signal is not None:
                observations.append(policy.StopRequested(self.stop_signal, time.time()))
            view = policy.observe(view, observations)
            decision = policy.decide(time.time(), view)
            if decision.action == policy.Action.CONTINUE:
                self.save_state(force=False)
                continue
            decided_at = time.time()
            failed_at = self._failure_time(view)
            view = self._end_attempt(plan, view, decision)
            self._record_attempt_end(decision, failed_at, decided_at)
            return AttemptOutcome(decision, view, failed_at, decided_at)

    def _failure_time(self, view: policy.AttemptView) -> float | None:
        """When the failure happened, best evidence first: an injected fault, the first
        observation of it."""
        if self._failed_at is not None:
            return self._failed_at
        times = [e.time for e in view.exits if e.code != 0 and not e.stopped]
        times += [x.time for x in view.lost] + [u.time for u in view.unhealthy]
        if view.hang is not None:
            times.append(view.hang.time)
        return min(times) if times else None

    def _pump(self, timeout_s: float, observations: list[policy.Observation]) -> None:
        """Handle every message that arrives within `timeout_s` (at least one wait)."""
        assert self.server is not None
        try:
            node_name, message = self.server.messages.get(timeout=timeout_s)
            self._handle_message(node_name, message, observations)
            while True:
                node_name, message = self.server.messages.get_nowait()
                self._handle_message(node_name, message, observations)
        except queue.Empty:
            pass

    def _in_attempt(self, node: str) -> bool:
        """Whether `node` belongs to the attempt being started or running."""
        return node in self.active_nodes

    def _end_attempt(
        self, plan: LaunchPlan, view: policy.AttemptView, decision: policy.Decision
    ) -> policy.AttemptView:
        """Stop what is left of the attempt and record every node's end."""
        assert self.server is not None
        names = [n.name for n in plan.nodes]
        if decision.action != policy.Action.SUCCEED:
            graceful = decision.action == policy.Action.STOP
            mode = "graceful" if graceful else "kill"
            for name in names:
                self.server.send(name, {"type": "stop", "reason": decision.reason, "mode": mode})
            if graceful:
                self.say(f"stopping: {decision.reason}")
            wait_s = self.spec.launch.stop_grace_s + 3.0 if graceful else KILL_WAIT_S
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                done = {e.node for e in view.exits} | {x.node for x in view.lost}
                if all(n in done for n in names):
                    break
                late: list[policy.Observation] = []
                self._pump(0.05, late)
                self._check_agents(plan, view, late)
                view = policy.observe(view, late)
            done = {e.node for e in view.exits} | {x.node for x in view.lost}
            for name in names:
                if name not in done:
                    # The agent did not answer: kill the node's processes the hard way.
                    self.scheduler.kill_node(self.record.job_id, name)
                    self.event("cleanup", f"{name}: agent did not stop in time; killed", node=name)
                    view = policy.observe(view, [policy.NodeLost(name, time.time())])
        for name in {x.node for x in view.lost}:
            # A lost node's processes may linger (an agent crash, not a dead host).
            self.scheduler.kill_node(self.record.job_id, name)
            self.connected.discard(name)
        exits = {e.node: e for e in view.exits}
        for name in names:
            node = self.record.node(name)
            if decision.action == policy.Action.SUCCEED:
                node.move(NodeState.SUCCEEDED)
            elif decision.action == policy.Action.STOP:
                node.move(NodeState.STOPPED, decision.reason)
            elif name == decision.blamed:
                node.move(NodeState.FAILED, decision.reason)
            elif name in exits and exits[name].code != 0 and not exits[name].stopped:
                node.move(NodeState.FAILED, policy.describe_exit(exits[name]))
            elif name in {x.node for x in view.lost}:
                node.move(NodeState.FAILED, f"{name}: node agent lost")
            else:
                node.move(NodeState.STOPPED, "stopped after another node failed")
        return view

    def _record_attempt_end(
        self, decision: policy.Decision, failed_at: float | None, decided_at: float
    ) -> None:
        attempt = self.record.attempts[-1]
        exit_code = decision.exit_code if decision.exit_code is not None else ExitCode.FAILED
        attempt.ended_at = time.time()
        attempt.exit_code = int(exit_code)
        attempt.cause = decision.cause.value if decision.cause is not policy.Cause.NONE else None
        attempt.blamed = decision.blamed
        outcome = {
            policy.Action.SUCCEED: AttemptState.SUCCEEDED,
            policy.Action.STOP: AttemptState.STOPPED,
        }.get(decision.action, AttemptState.FAILED)
        attempt.move(outcome, decision.reason)
        self.save_state()
        self.event(
            "attempt_ended",
            f"attempt {attempt.number} {outcome.value}: {decision.reason}",
            outcome=outcome.value,
            reason=decision.reason,
            cause=attempt.cause,
            blamed=decision.blamed,
            first_step=attempt.first_step,
            first_step_at=attempt.first_step_at,
            last_step=attempt.last_step,
            last_step_at=attempt.last_step_at,
            restored_step=attempt.restored_step,
            failed_at=failed_at if outcome is AttemptState.FAILED else None,
            decided_at=decided_at,
        )

    def _end_job(
        self, state: JobState, reason: str, exit_code: ExitCode, gave_up: bool = False
    ) -> ExitCode:
        self.record.move(state, reason)
        self.record.exit_code = int(exit_code)
        self.save_state()
        kind = "job_gave_up" if gave_up else f"job_{state.value}"
        blamed = self.record.attempts[-1].blamed if self.record.attempts else None
        self.event(kind, reason, exit_code=int(exit_code), blamed=blamed)
        return exit_code

    # -- messages ----------------------------------------------------------------------------
    ATTEMPT_MESSAGES = frozenset({"started", "progress", "result", "event", "exit", "stacks"})

    def _handle_message(
        self, node_name: str, message: dict[str, Any], observations: list[policy.Observation]
    ) -> None:
        kind = message.get("type")
        now = time.time()
        try:
            node = self.record.node(node_name)
        except KeyError:
            return
        current = self.record.attempts[-1].number if self.record.attempts else None
        if kind in self.ATTEMPT_MESSAGES and message.get("attempt") != current:
            return  # a late message of an earlier attempt
        in_attempt = self._in_attempt(node_name)
        if kind == "hello":
            self.connected.add(node_name)
            self.event(
                "agent_connected", f"{node_name}: agent up", node=node_name, pid=message.get("pid")
            )
            if not in_attempt:
                self._probe_standby(node_name)
        elif kind == "disconnected":
            self.connected.discard(node_name)
            if in_attempt and node.exit_code is None:
                observations.append(policy.NodeLost(node_name, now))
            elif not in_attempt and node.state == NodeState.SPARE:
                node.move(NodeState.FAILED, "agent lost while on standby")
                self.event("spare_lost", f"{node_name}: agent lost on standby", node=node_name)
        elif kind == "verdict":
            if in_attempt and message.get("phase") != "standby":
                self._on_verdict(node_name, message, observations)
            else:
                self._on_standby_verdict(node_name, message)
        elif kind == "stacks":
            self._on_stacks(node_name, message)
        elif kind == "started":
            if self.watch is not None:
                self.watch.node_started(node_name, time.monotonic())
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
            self._on_progress(node, message.get("ranks", {}))
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
            self._on_worker_event(node_name, message)
        elif kind == "exit":
            code = int(message.get("code", 1))
            errors = tuple(str(e.get("message", "")) for e in message.get("errors", []))
            stopped = bool(message.get("stopped"))
            observations.append(
                policy.NodeExit(node_name, code, now, stopped=stopped, errors=errors)
            )
            node.exit_code = code
            if self.watch is not None:
                self.watch.node_exited(node_name)
            how = "was stopped" if stopped else f"exited with {code}"
            self.event(
                "node_exited",
                f"{node_name}: torchrun {how}",
                node=node_name,
                code=code,
                errors=list(errors),
                stopped=stopped,
            )

    def _on_worker_event(self, node_name: str, message: dict[str, Any]) -> None:
        data = {**(message.get("data") or {}), "rank": message.get("rank")}
        data.pop("node", None)  # the reporting node is the event's own node
        kind = str(message.get("kind", "worker_event"))
        attempt = self.record.attempts[-1]
        if kind == "checkpoint_committed" and data.get("step") is not None:
            step = int(data["step"])
            self.record.committed_step = max(self.record.committed_step or 0, step)
            self._dirty = True
        elif kind == "checkpoint_restored" and data.get("step") is not None:
            attempt.restored_step = int(data["step"])
            self._dirty = True
        self.event(kind, str(message.get("message", "")), node=node_name, **data)

    def _on_progress(self, node: NodeRecord, ranks: dict[str, Any]) -> None:
        if self.watch is not None:
            self.watch.record(node.name, ranks, time.monotonic())
        steps = [int(r["step"]) for r in ranks.values()]
        if not steps:
            return
        now = time.time()
        node.step = max(steps)
        self.record.step = max(self.record.step or 0, node.step)
        attempt = self.record.attempts[-1]
        if attempt.first_step is None:
            attempt.first_step, attempt.first_step_at = min(steps), now
            restored = attempt.restored_step or 0
            self.event(
                "first_step",
                f"attempt {attempt.number}: first step {min(steps)} done"
                + (f" (restored step {restored})" if restored else ""),
                node=node.name,
                step=min(steps),
                restored_step=restored,
            )
            for spare in self._standby():
                if spare in self.connected and self.server is not None:
                    self.server.send(spare, {"type": "warm_up", "log_path": self._log_path(spare)})
        attempt.last_step = max(attempt.last_step or 0, node.step)
        attempt.last_step_at = now
        self._dirty = True
        self._announce_progress()
        if self.faults is not None:
            for fault in self.faults.due(self.record.step):
                self._failed_at = time.time()
                done = self.faults.fire(fault)
                self.record.faults_fired.append(fault.describe())
                self.event(
                    "fault_injected",
                    f"injected {fault.describe()}: {done}",
                    node=fault.node,
                    fault=fault.kind,
                    spec=fault.describe(),
                    step=self.record.step,
                )
                self.say(f"fault injected: {fault.describe()}")
                self.save_state()

    def _log_path(self, node: str) -> str:
        return f"{self.store.local_job_dir(self.record.job_id)}/logs/{node}.log"

    def _probe_standby(self, node: str) -> None:
        """Ask a spare (or a node coming back) for a health verdict while it waits."""
        assert self.server is not None
        gate = gate_plan(self.spec, self._facts())
        self.server.send(
            node,
            {
                "type": "probe",
                "phase": "standby",
                "gate": dataclasses.asdict(gate),
                "rdzv": f"{self.options.rdzv_host}:{self.rdzv_port}",
            },
        )

    def _on_standby_verdict(self, node: str, message: dict[str, Any]) -> None:
        try:
            record = NodeVerdictRecord.from_dict(message.get("record") or {})
        except ValueError as bad:
            self.event("verdict_unreadable", f"{node}: unreadable verdict: {bad}", node=node)
            return
        self.store.write_node(self.record.job_id, node, record.to_dict())
        verdict = record.verdict
        detail = "" if verdict.status is Verdict.OK else f": {verdict.reason}"
        self.event(
            "node_verdict",
            f"{node}: {verdict.status.value} (on standby){detail}",
            node=node,
            phase="standby",
            status=verdict.status.value,
            reason=verdict.reason,
        )
        exclusion = self.blocklist.get(node)
        clean = verdict.status is not Verdict.UNHEALTHY
        if clean and exclusion is not None and not exclusion.active(time.time()):
            del self.blocklist[node]
            self._save_blocklist()
            self.record.node(node).move(NodeState.SPARE, "readmitted after a clean probe")
            self.event(
                "node_readmitted",
                f"{node}: exclusion expired and the probe is clean: back on standby",
                node=node,
            )
            self.save_state()
        if verdict.status is Verdict.UNHEALTHY:
            now = time.time()
            reason = f"{node}: UNHEALTHY on standby: {verdict.reason}"
            exclusion = policy.Exclusion(
                node, reason, policy.Cause.NODE_FAULT.value, now, now + self.spec.recovery.exclude_s
            )
            self._apply_exclusions((exclusion,))
            self.save_state()

    def _announce_progress(self) -> None:
        step = self.record.step or 0
        total = self.spec.max_steps
        every = max(1, (total or 100) // 5)
        if step >= self._last_announced_step + every:
            self._last_announced_step = step - step % every
            self.say(f"step {step}" + (f"/{total}" if total else ""))

    def _check_agents(
        self, plan: LaunchPlan, view: policy.AttemptView, observations: list[policy.Observation]
    ) -> None:
        """An agent process that exited without reporting is a lost node."""
        done = {e.node for e in view.exits} | {x.node for x in view.lost}
        for node_plan in plan.nodes:
            name = node_plan.name
            if name not in done and self.scheduler.agent_exit_code(name) is not None:
                observations.append(policy.NodeLost(name, time.time()))


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
