"""The controller loop: observe -> decide -> act, attempt after attempt, until the job ends.

The controller hosts the rendezvous store (so losing any node, node-0 included, never takes the
store with it) and the control channel the node agents report on. Its parts, each with one job:

- `Fleet` (fleet.py): the node agents — started, kept on standby, stopped, killed;
- `Intake` (intake.py): each agent message -> the record, the journal and observations;
- `Attempt` (attempt.py): one attempt's loop, from its launch to its decision and its end;
- `AttemptMonitor` (monitor.py): verdicts, stragglers, hangs and stack dumps of an attempt;
- `Journal` (journal.py): state.json, typed events, blocklist — the job store's one writer;
- faults (faults.py): test-only fault hooks, a no-op unless faults are planned.

Every decision is pure and made elsewhere: `policy.decide` (what an attempt's observations
mean), `placement.plan_recovery` (exclude, promote, shrink, relaunch or end the job),
`placement.first_selection` and the standby decisions. This module carries them out.
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

from trainctl.cancel import CANCEL, CancelWatch
from trainctl.checkpoint import fence
from trainctl.events import FenceFailed, JobFailed, RecoveryPlanned
from trainctl.exitcodes import ExitCode
from trainctl.health.liveness import (
    PROGRESS_INTERVAL_S,
    LivenessPolicy,
    controller_beat_interval,
    progress_interval,
    scaled_interval,
)
from trainctl.launch.control import ControlServer
from trainctl.launch.local import LocalScheduler
from trainctl.launch.plan import Facts, LaunchPlan, agent_env, gate_plan, plan_attempt
from trainctl.launch.scheduler import NodeScheduler
from trainctl.protocol import Env, Probe, new_token
from trainctl.recovery import placement, policy
from trainctl.recovery.attempt import Attempt, Crew
from trainctl.recovery.faults import plan_faults
from trainctl.recovery.fleet import Fleet
from trainctl.recovery.gpu_recorder import GpuRecorder
from trainctl.recovery.intake import Intake
from trainctl.recovery.journal import Journal
from trainctl.recovery.live_view import LiveView, MetricsEndpoint
from trainctl.recovery.rendezvous import RendezvousStore
from trainctl.secrets import JobSecrets, merge_options
from trainctl.spec import JobSpec
from trainctl.state import JobState, NodeState

FAILURE_HISTORY = 20
"""Failure signatures remembered for crash-loop detection."""


@dataclasses.dataclass
class ControllerOptions:
    python: str = sys.executable
    rdzv_host: str = "127.0.0.1"
    rdzv_port: int = 0
    """The rendezvous store's port (0: chosen when the job starts)."""
    node_addr: str = ""
    """The address every node is reached at, when the scheduler knows it (local: 127.0.0.1)."""
    restart_count: int | None = None
    """The scheduler's requeue count (Slurm's SLURM_RESTART_COUNT), read at the edge."""
    secrets: JobSecrets = dataclasses.field(default_factory=JobSecrets)
    on_message: Callable[[str], None] = lambda message: None
    """Where human progress lines go (the CLI passes its console)."""
    abandoned: Callable[[], bool] = lambda: False
    """True once another controller took the job over (its lease lost)."""
    metrics: MetricsEndpoint | None = None
    """The ``/metrics`` server `launch --metrics-port` opened (closed when the job ends)."""


class Controller:
    def __init__(
        self,
        spec: JobSpec,
        journal: Journal,
        options: ControllerOptions,
        scheduler: NodeScheduler | None = None,
    ) -> None:
        self.spec = spec
        self.journal = journal
        self.record = journal.record
        self.store = journal.store
        self.options = options
        self.scheduler: NodeScheduler = scheduler or LocalScheduler(options.python)
        self.stop_signal: str | None = None
        self.cancels = CancelWatch(self.store, self.record.job_id, self.record.cancels_cleared)
        self.run_dir = self.store.local_job_dir(self.record.job_id)
        self.secrets_path = self.run_dir / "private" / "secrets.json"
        health = spec.health
        self.server = ControlServer(
            new_token(),
            options.rdzv_host,
            0,
            liveness=LivenessPolicy(
                interval_s=scaled_interval(
                    health.heartbeat_interval_s, spec.nodes + spec.spare_nodes
                ),
                threshold=health.phi_threshold,
                acceptable_pause_s=health.heartbeat_pause_s,
            ),
            beat_interval_s=controller_beat_interval(
                health.heartbeat_interval_s, spec.nodes + spec.spare_nodes
            ),
        )
        self.faults = plan_faults(
            spec, self.scheduler, journal, self.run_dir / "faults", self.say, self.server.peers.get
        )
        self.fleet = Fleet(
            self.faults.reachable(self.scheduler),
            self.server,
            journal,
            self._agent_env,
            spec.spare_nodes,
        )
        self.intake = Intake(
            journal,
            self.fleet,
            self.faults,
            self.exclude,
            self._standby_probe,
            self._log_path,
            spec.recovery.exclude_s,
            spec.max_steps,
            self.say,
            GpuRecorder(journal, spec.health.gpu_idle_util_pct, spec.health.gpu_idle_window_s),
            per_gpu=spec.per_gpu,
        )
        self.live = LiveView(journal, self.intake.gpu, options.metrics)
        self.intake.progress = self.live.progress

    def _stop_requested(self) -> str | None:
        """A stop signal's name, or ``cancel`` once someone asked (`trainctl cancel`)."""
        if self.stop_signal is not None:
            return self.stop_signal
        return CANCEL if self.cancels.check() is not None else None

    def say(self, message: str) -> None:
        self.options.on_message(message)

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
        self.journal.controller_started(os.uname().nodename)
        self.rdzv = RendezvousStore(self.options.rdzv_host, self.options.rdzv_port)
        self.journal.load_blocklist()
        if self.options.secrets:
            self.options.secrets.write(self.secrets_path)
        try:
            return self._run_job()
        except BaseException as error:
            if not self.record.state.terminal and self.journal.writable():
                # A bug in trainctl, not in the job: say so in the store, then let it surface.
                reason = f"controller error: {type(error).__name__}: {error}"
                self.record.state, self.record.reason = JobState.FAILED, reason
                self.record.exit_code = int(ExitCode.FAILED)
                self.journal.save_state()
                self.journal.event(JobFailed(exit_code=int(ExitCode.FAILED)), reason)
            raise
        finally:
            self.journal.flush_folds(every=True)
            self.fleet.shutdown()
            self.intake.gpu.flush()  # after the agents are gone: their last samples are in
            self.live.close(time.time())
            self.server.close()
            self.faults.close()
            JobSecrets.remove(self.secrets_path)
            self.rdzv.close()
            self.store.upload_logs(self.record.job_id)

    def _facts(self, rendezvous: bool = True) -> Facts:
        """The job's paths and endpoints (`rendezvous=False`: without the rendezvous port, so
        agents can start before the store is up)."""
        return Facts(
            python=self.options.python,
            storage_root=self.store.root,
            run_dir=str(self.run_dir),
            rdzv_host=self.options.rdzv_host,
            rdzv_port=self.rdzv.port() if rendezvous else 0,
            control_endpoint=self.server.endpoint,
            checkpoint_root=self.store.checkpoint_root(
                self.record.job_id, self.spec.checkpoint.storage
            ),
            secrets_file=str(self.secrets_path) if self.options.secrets else "",
            node_addr=self.options.node_addr,
        )

    def _budgets(self) -> placement.Budgets:
        return placement.Budgets(
            max_restarts=self.spec.launch.max_restarts,
            per_cause=self.spec.recovery.restarts_per_cause,
            crash_loop_limit=self.spec.recovery.crash_loop_limit,
            exclude_s=self.spec.recovery.exclude_s,
            nodes=self.spec.nodes,
            fewest_nodes=self.spec.fewest_nodes,
        )

    def _run_job(self) -> ExitCode:
        last = self.record.attempts[-1].nodes if self.record.attempts else None
        selection = placement.first_selection(
            self.spec.nodes,
            self.spec.fewest_nodes,
            self.fleet.names,
            last,
            self.journal.blocklist,
            time.time(),
        )
        if selection is None:
            out = placement.excluded_now(self.journal.blocklist, time.time())
            return self.journal.end_job(
                JobState.FAILED,
                f"not enough usable nodes: {len(out)} excluded, the job needs "
                f"at least {self.spec.fewest_nodes} (min_nodes)",
                ExitCode.FAILED,
            )
        self.fleet.start(self._pool(selection.nodes))
        while True:
            self._mark_spares(selection.nodes)
            decision = self._run_attempt(selection)
            if decision.action == policy.Action.ABANDON:
                return ExitCode.FAILED  # the job is another controller's now: record nothing
            if decision.action == policy.Action.SUCCEED:
                return self.journal.end_job(JobState.SUCCEEDED, decision.reason, ExitCode.FINISHED)
            cancel = self.cancels.check()
            if cancel is not None and decision.action in (policy.Action.STOP, policy.Action.FAIL):
                return self.journal.cancel_job(cancel, ExitCode.CANCELLED)
            if decision.action == policy.Action.STOP:
                code = decision.exit_code or ExitCode.FAILED
                return self.journal.end_job(JobState.STOPPED, decision.reason, code)
            if self.stop_signal is not None:
                code = ExitCode.PREEMPTED if self.stop_signal != "SIGINT" else ExitCode.FAILED
                reason = f"stop requested ({self.stop_signal}) while recovering"
                return self.journal.end_job(JobState.STOPPED, reason, code)
            recovery = self._plan_recovery(decision, selection.nodes)
            self.exclude(recovery.exclude)
            if recovery.selection is None:
                return self.journal.end_job(
                    JobState.FAILED,
                    recovery.reason,
                    recovery.exit_code or ExitCode.FAILED,
                    gave_up=recovery.action == placement.RecoveryAction.GIVE_UP,
                )
            cause = decision.cause.value
            self.record.restarts[cause] = self.record.restarts.get(cause, 0) + 1
            self.record.move(JobState.RECOVERING, recovery.reason)
            selection = recovery.selection
            self.journal.event(
                RecoveryPlanned(
                    action="relaunch",
                    cause=cause,
                    next_attempt=len(self.record.attempts),
                    nodes=list(selection.nodes),
                    promoted=list(selection.promoted),
                    shrunk=selection.shrunk,
                ),
                recovery.reason,
            )
            self.say(recovery.reason)
            self.journal.save_state()
            self.fleet.start(selection.nodes)

    def _plan_recovery(
        self, decision: policy.Decision, nodes: tuple[str, ...]
    ) -> placement.Recovery:
        history = [placement.FailureRecord.from_json(f) for f in self.record.failures]
        recovery = placement.plan_recovery(
            time.time(),
            decision,
            self._budgets(),
            self.record.restarts,
            history,
            self.record.committed_step,
            nodes,
            self.fleet.usable_spares(),
            self.journal.blocklist,
        )
        latest = placement.FailureRecord.of(decision, self.record.committed_step, time.time())
        self.record.failures = [*self.record.failures, latest.to_json()][-FAILURE_HISTORY:]
        return recovery

    def exclude(self, exclusions: tuple[placement.Exclusion, ...]) -> None:
        """Carry out exclusions: blocklist and record (journal), then the node's agent goes."""
        for exclusion in exclusions:
            self.journal.exclude(exclusion)
            self.say(f"{exclusion.node} excluded: {exclusion.reason}")
            self.fleet.stop(exclusion.node, "excluded")

    # -- agents ------------------------------------------------------------------------------
    def _agent_env(self, node: str) -> tuple[dict[str, str], str]:
        facts = self._facts(rendezvous=False)
        log_path = self._log_path(node)
        env = agent_env(self.spec, facts, self.record.job_id, node)
        env[Env.AGENT_LOG] = log_path
        env[Env.CONTROL_TOKEN] = self.server.token
        health = self.spec.health
        env[Env.LIVENESS] = json.dumps(
            {
                "interval_s": scaled_interval(
                    health.heartbeat_interval_s, self.spec.nodes + self.spec.spare_nodes
                ),
                "threshold": health.phi_threshold,
                "acceptable_pause_s": health.controller_pause_s,
            }
        )
        every = progress_interval(self.spec.nodes + self.spec.spare_nodes)
        if health.hang_timeout_s:  # a pinned hang timeout sees a few progress lines first
            every = min(every, max(PROGRESS_INTERVAL_S, health.hang_timeout_s / 4))
        env[Env.PROGRESS_INTERVAL] = repr(every)
        env.update(self.faults.agent_env())
        return env, log_path

    def _log_path(self, node: str) -> str:
        return f"{self.run_dir}/logs/{node}.log"

    def _standby_probe(self) -> Probe:
        return Probe("standby", gate_plan(self.spec, self._facts()), self._rdzv_endpoint())

    def _rdzv_endpoint(self) -> str:
        return f"{self.options.rdzv_host}:{self.rdzv.port()}"

    def _pool(self, active: tuple[str, ...]) -> list[str]:
        """The attempt's nodes plus the spares that should wait on standby."""
        return placement.pool(
            self.fleet.names, active, self.spec.spare_nodes, self.journal.blocklist, time.time()
        )

    def _mark_spares(self, active: tuple[str, ...]) -> None:
        for node in self.record.nodes:
            waiting = node.name in self.fleet.connected or node.name in self.fleet.started
            keep = node.state in (NodeState.EXCLUDED, NodeState.SPARE)
            if node.name not in active and not keep and waiting:
                node.move(NodeState.SPARE, "on standby")

    # -- one attempt -------------------------------------------------------------------------
    def _pump(
        self, timeout_s: float, observations: list[policy.Observation], first: bool = False
    ) -> None:
        """Take the messages that arrive within `timeout_s` (at least one wait): all of them,
        or (`first`) those up to the first that says a node failed — a running attempt's
        policy sees a failure before the rest of a burst of progress (a thousand lines at
        1,024 nodes) is read. A node's loss comes first in the inbox (`trainctl.launch.inbox`);
        the losses that come with it are read while the attempt stops (`policy.lost_together`
        looks at them there)."""
        try:
            seen = self.intake.take(self.server.messages.get(timeout=timeout_s))
            observations += seen
            while not (first and any(map(policy.failed, seen))):
                seen = self.intake.take(self.server.messages.get_nowait())
                observations += seen
        except queue.Empty:
            pass
        self.journal.flush_folds()
        self.live.tick(time.time())

    def _start_attempt(self, selection: placement.NodeSelection) -> LaunchPlan:
        number = len(self.record.attempts)
        facts = self._facts()
        out = sorted(placement.excluded_now(self.journal.blocklist, time.time()))
        spares = placement.standby(
            self.fleet.names, selection.nodes, self.journal.blocklist, time.time()
        )
        plan = plan_attempt(
            self.spec,
            facts,
            self.record.job_id,
            number,
            selection.nodes,
            excluded=tuple(out),
            spares=tuple(spares),
        )
        self._advance_fence(number)
        plan_path = self._plan_path(number)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan.to_json(), indent=1))
        self.journal.start_attempt(
            selection, plan.world_size, plan.rdzv_endpoint, out, self.options.restart_count
        )
        extra = f" ({selection.reason})" if selection.reason else ""
        self.say(
            f"attempt {number}: {len(selection.nodes)} node(s), world size "
            f"{plan.world_size or 'one worker per GPU'}" + extra
        )
        return plan

    def _advance_fence(self, attempt: int) -> None:
        """Raise the checkpoint fence to `attempt` before it starts: workers of earlier
        attempts still running somewhere can no longer write checkpoints
        (`trainctl.checkpoint.fence`)."""
        checkpoint = self.spec.checkpoint
        root = self._facts().checkpoint_root
        if not root or not checkpoint.interval_steps:
            return
        try:
            from trainctl.checkpoint.storage import open_storage, transfer_config

            options = merge_options(
                checkpoint.storage_options, self.options.secrets.storage_options
            )
            # bounded like the store: a dead endpoint costs an attempt two storage timeouts
            config = dataclasses.replace(
                transfer_config(checkpoint), give_up_s=self.store.files.timeout_s
            )
            storage = open_storage(root, storage_options=options or None, config=config)
            try:
                fence.advance(storage, attempt)
            finally:
                storage.close()
        except Exception as error:  # unfenced is how every job ran before: say so, go on
            text = f"{type(error).__name__}: {error}"
            self.journal.event(
                FenceFailed(attempt=attempt, error=text),
                f"attempt {attempt} runs unfenced: the checkpoint fence could not be raised "
                f"({text})",
            )

    def _plan_path(self, attempt: int) -> Path:
        return self.run_dir / f"attempt-{attempt}" / "plan.json"

    def _run_attempt(self, selection: placement.NodeSelection) -> policy.Decision:
        self.fleet.active = selection.nodes
        early: list[policy.Observation] = []
        early += self.fleet.wait_for(
            selection.nodes,
            lambda timeout_s: self._pump(timeout_s, early),
            lambda: self._stop_requested() is not None,
        )
        # A loss noticed while waiting, of an agent that has since been replaced (the previous
        # attempt's teardown, seen late after a controller pause), is not this attempt's.
        early = [
            seen
            for seen in early
            if not (
                isinstance(seen, policy.NodeLost)
                and seen.node in self.fleet.connected
                and seen.time < self.fleet.hello_at.get(seen.node, 0.0)
            )
        ]
        plan = self._start_attempt(selection)
        crew = Crew(
            self.spec,
            self.journal,
            self.fleet,
            self.intake,
            self.faults,
            self._pump,
            self._stop_requested,
            self.options.abandoned,
            self.say,
        )
        return Attempt(crew, plan, self._plan_path(plan.attempt), early).run()
