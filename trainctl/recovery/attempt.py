"""One attempt, from its launch to its decision: observe, ask the policy, and end it.

The controller plans an attempt and hands it to an `Attempt` with its `Crew` (the parts it
works through). Each turn of the loop takes the agents' messages (intake -> observations),
adds what the fleet, the monitor and the signals saw, folds them into the attempt's view and
asks `policy.decide`; on anything but CONTINUE it stops what is left of the attempt (politely
for a stop, at once after a failure), records every node's end and the attempt's, and returns
the decision for the controller's recovery plan.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trainctl.events import Cleanup
from trainctl.exitcodes import ExitCode
from trainctl.launch.plan import LaunchPlan
from trainctl.protocol import Launch, Stop
from trainctl.recovery import blame, policy
from trainctl.recovery.faults import NoFaults
from trainctl.recovery.fleet import Fleet
from trainctl.recovery.intake import Intake
from trainctl.recovery.journal import Journal
from trainctl.recovery.monitor import AttemptMonitor
from trainctl.spec import JobSpec
from trainctl.state import AttemptState

KILL_WAIT_S = 5.0
"""After a failure, how long survivors get to report their torchrun killed."""
STOP_MARGIN_S = 3.0
"""After a graceful stop, how long past the recipe's grace the agents get to report."""


class Pump(Protocol):
    def __call__(
        self, timeout_s: float, observations: list[policy.Observation], first: bool = False
    ) -> None:
        """Take the agents' messages for up to `timeout_s`, adding observations to the list
        (`first`: stop at the first message that makes one)."""


@dataclasses.dataclass(frozen=True)
class Crew:
    """The controller's parts an attempt works through."""

    spec: JobSpec
    journal: Journal
    fleet: Fleet
    intake: Intake
    faults: NoFaults
    pump: Pump
    stop_signal: Callable[[], str | None]
    abandoned: Callable[[], bool]
    say: Callable[[str], None]


def finished(view: policy.AttemptView) -> set[str]:
    """Nodes of the attempt that reported their end or were lost."""
    return {e.node for e in view.exits} | {x.node for x in view.lost}


class Attempt:
    def __init__(
        self, crew: Crew, plan: LaunchPlan, plan_path: Path, early: list[policy.Observation]
    ) -> None:
        self.crew = crew
        self.plan = plan
        self.plan_path = plan_path
        self.nodes = tuple(n.name for n in plan.nodes)
        self.view = policy.observe(policy.AttemptView(nodes=self.nodes), early)
        self.monitor = AttemptMonitor(
            crew.spec.health,
            crew.journal,
            plan.attempt,
            self.nodes,
            plan.world_size,
            crew.spec.max_steps,
            crew.fleet.send,
            crew.say,
        )

    def run(self) -> policy.Decision:
        crew = self.crew
        crew.intake.monitor = self.monitor
        crew.faults.attempt_started()
        memory = crew.spec.checkpoint.memory
        holders = {n: crew.fleet.holders[n] for n in self.nodes if n in crew.fleet.holders}
        launch = Launch(
            str(self.plan_path),
            holders=holders if memory.enabled else {},
            replicas=memory.replicas,
            slots=memory.slots,
        )
        for name in self.nodes:
            if name in crew.fleet.connected:
                crew.fleet.send(name, launch)
        try:
            return self._until_decided()
        finally:
            gc.unfreeze()  # what the attempt left is the collector's again

    def _until_decided(self) -> policy.Decision:
        crew = self.crew
        frozen = False
        while True:
            observations = self._observe()
            self.view = policy.observe(self.view, observations)
            decision = policy.decide(time.time(), self.view)
            if decision.action == policy.Action.CONTINUE:
                crew.journal.save_state(force=False)
                if not frozen and crew.journal.record.attempts[-1].first_step is not None:
                    # Training runs: the attempt's state is built (plan, records, detectors:
                    # 300,000 objects at 1,024 nodes). Each full collection walked all of it,
                    # 0.1-0.4 s every ~16 s there (3% of a core, and a decision waiting
                    # behind it); frozen, the collector walks only what changes.
                    gc.freeze()
                    frozen = True
                continue
            decided_at = time.time()
            failed_at = self._failure_time()
            self._stop(decision)
            decision = self._conclude(decision)
            together = policy.lost_together(decision, self.view)
            if together:
                decision = dataclasses.replace(decision, lost_with=together)
            for name in self.nodes:
                outcome = policy.node_outcome(name, self.view, decision)
                crew.journal.record.node(name).move(*outcome)
            self._record_end(decision, failed_at, decided_at)
            return decision

    def _conclude(self, decision: policy.Decision) -> policy.Decision:
        """The decision revised with every node's end and the job's earlier failures."""
        record, recovery = self.crew.journal.record, self.crew.spec.recovery
        return blame.conclude(
            decision,
            self.view,
            # A script without trainctl.runtime reports no steps: whether it got past its
            # first one is unknown, so its errors are never judged deterministic.
            stepped=record.attempts[-1].first_step is not None or not self.crew.spec.uses_runtime,
            history=[blame.FailureRecord.from_json(f) for f in record.failures],
            now=time.time(),
            repeat=blame.RepeatPolicy(
                recovery.repeat_offender_crashes, recovery.repeat_offender_window_s
            ),
        )

    def _observe(self) -> list[policy.Observation]:
        """One turn's observations: messages, vanished agents, the monitor, signals, lease."""
        crew, monitor = self.crew, self.monitor
        observations: list[policy.Observation] = []
        crew.pump(0.1, observations, first=True)
        observations += crew.fleet.check(self.nodes, finished(self.view))
        for silent in crew.fleet.silent_spares():
            crew.intake.spare_silent(silent)
        monitor.check_stragglers()
        monitor.check_hang(self.nodes)
        hang = monitor.declared_hang()
        if hang is not None:
            observations.append(hang)
        crew.faults.tick()
        crew.fleet.refill()
        stop = crew.stop_signal()
        if stop is not None:
            observations.append(policy.StopRequested(stop, time.time()))
        if crew.abandoned():
            observations.append(policy.Abandoned(time.time()))
        return observations

    def _failure_time(self) -> float | None:
        """When the failure happened, best evidence first: an injected fault, the first
        observation of it."""
        if self.crew.faults.failed_at is not None:
            return self.crew.faults.failed_at
        view = self.view
        times = [e.time for e in view.exits if e.code != 0 and not e.stopped]
        times += [x.time for x in view.lost] + [u.time for u in view.unhealthy]
        if view.hang is not None:
            times.append(view.hang.time)
        return min(times) if times else None

    def _stop(self, decision: policy.Decision) -> None:
        """Stop what is left of the attempt; every node reports its end (or is lost)."""
        crew = self.crew
        if decision.action != policy.Action.SUCCEED:
            graceful = decision.action == policy.Action.STOP
            for name in self.nodes:
                crew.fleet.send(name, Stop(decision.reason, "graceful" if graceful else "kill"))
            if graceful:
                crew.say(f"stopping: {decision.reason}")
            wait_s = crew.spec.launch.stop_grace_s + STOP_MARGIN_S if graceful else KILL_WAIT_S
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not set(self.nodes) <= finished(self.view):
                late: list[policy.Observation] = []
                crew.pump(0.05, late)
                late += crew.fleet.check(self.nodes, finished(self.view))
                self.view = policy.observe(self.view, late)
            for name in self.nodes:
                if name not in finished(self.view):
                    # The agent did not answer: kill the node's processes the hard way.
                    crew.fleet.kill(name)
                    crew.journal.event(
                        Cleanup(), f"{name}: agent did not stop in time; killed", node=name
                    )
                    self.view = policy.observe(self.view, [policy.NodeLost(name, time.time())])
        for name in {x.node for x in self.view.lost}:
            crew.fleet.kill(name)  # a lost node's processes may linger (an agent crash)

    def _record_end(
        self, decision: policy.Decision, failed_at: float | None, decided_at: float
    ) -> None:
        outcome = {
            policy.Action.SUCCEED: AttemptState.SUCCEEDED,
            policy.Action.STOP: AttemptState.STOPPED,
        }.get(decision.action, AttemptState.FAILED)
        code = decision.exit_code if decision.exit_code is not None else ExitCode.FAILED
        self.crew.journal.end_attempt(
            outcome,
            decision.reason,
            exit_code=int(code),
            cause=decision.cause.value if decision.cause is not policy.Cause.NONE else None,
            blamed=decision.blamed,
            failed_at=failed_at if outcome is AttemptState.FAILED else None,
            decided_at=decided_at,
        )
