"""Watching a running attempt: health verdicts, stragglers, hangs and their stack dumps.

Part of the controller (`Controller` inherits it): agents report ``verdict`` messages
(preflight and periodic probes); each node's latest one goes to ``nodes/<node>.json`` and an
UNHEALTHY one becomes a node-fault observation. From the step times in ``progress`` messages
(`ProgressWatch`) it detects hangs — then asks every agent to dump its workers' stacks into
``stacks/attempt-<n>/<node>-rank-<r>.txt`` before declaring the hang — and stragglers (a
DEGRADED verdict merged into the node's record).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict, worst_of
from trainctl.launch.control import ControlServer
from trainctl.launch.plan import LaunchPlan
from trainctl.recovery import policy
from trainctl.recovery.watch import HangCheck, ProgressWatch
from trainctl.spec import JobSpec
from trainctl.state import JobRecord
from trainctl.store import JobStore

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


class AttemptMonitoring:
    """The controller's health and progress watching for the current attempt."""

    spec: JobSpec
    store: JobStore
    record: JobRecord
    watch: ProgressWatch | None
    _probes: dict[str, NodeVerdictRecord]
    _stragglers: dict[str, HealthVerdict]
    _hang: PendingHang | None
    _last_straggler_check: float

    def event(self, kind: str, message: str, /, node: str | None = None, **data: Any) -> None:
        raise NotImplementedError

    def say(self, message: str) -> None:
        raise NotImplementedError

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
        # Every rank whose stacks were dumped is evidence, not only those past the timeout:
        # in synchronous training the stopped rank and the ranks waiting for it fall silent
        # together, and which one crosses the timeout first is a race.
        silence = {h.member: h.silent_s for h in hang.check.hung}
        now = time.monotonic()
        for rank in hang.states:
            if rank not in silence and rank in watch.ranks:
                silence[rank] = now - watch.ranks[rank].last_progress_at
        ranks = tuple(
            policy.SilentRank(
                rank=rank,
                node=watch.node_of(rank),
                step=watch.step_of(rank),
                silent_s=silent_s,
                process_state=hang.states.get(rank),
            )
            for rank, silent_s in sorted(silence.items())
        )
        timeout = hang.check.timeout
        observations.append(
            policy.Hang(hang.detected_at, timeout.timeout_s, timeout.explanation, ranks)
        )
        hang.declared = True
