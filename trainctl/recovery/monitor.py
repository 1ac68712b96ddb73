"""Watching a running attempt: health verdicts, stragglers, hangs and their stack dumps.

Agents report verdicts (preflight and periodic probes): each node's latest one goes to
``nodes/<node>.json`` and an UNHEALTHY one becomes a node-fault observation. From the step
times agents forward (`ProgressWatch`) it detects hangs — then asks every agent to dump its
workers' stacks into ``stacks/attempt-<n>/<node>-rank-<r>.txt`` before declaring the hang —
and stragglers (a DEGRADED verdict merged into the node's record).

One `AttemptMonitor` per attempt; it records through the journal and asks for dumps through
the callable it is given. The decisions it feeds are pure: `ProgressWatch` asks
`trainctl.health.progress`, and the hang it declares is judged by `policy.decide`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from trainctl.events import (
    HangDetected,
    NodeVerdictChanged,
    StacksSaved,
    Straggler,
    StragglerCleared,
)
from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict, worst_of
from trainctl.protocol import DumpStacks, Heartbeat, Message, StackDump
from trainctl.recovery import policy
from trainctl.recovery.hangs import StackPosition, stack_position
from trainctl.recovery.journal import Journal
from trainctl.recovery.watch import HangCheck, ProgressWatch
from trainctl.spec import HealthSpec

STRAGGLER_CHECK_INTERVAL_S = 1.0
"""Straggler detection runs at most this often (and only when new step times arrived)..."""
STRAGGLER_CHECK_NODES_PER_S = 128
HANG_CHECK_INTERVAL_S = 0.1
"""Ranks are checked for a hang at most this often (each check walks every rank: 8,192 at 1,024
nodes x 8, on every turn of the attempt's loop before; hang timeouts are seconds)."""


def straggler_check_interval(nodes: int) -> float:
    """...and at most once per `nodes / STRAGGLER_CHECK_NODES_PER_S` seconds: a check costs
    O(N W log N), and a straggler is a trend over `straggler_window` steps (20), so a check
    every few seconds at 1,024 nodes (8 s: at 4 s it was still 8% of the controller's CPU)
    still flags one within a few steps of the window."""
    return max(STRAGGLER_CHECK_INTERVAL_S, nodes / STRAGGLER_CHECK_NODES_PER_S)


def hang_check_interval(nodes: int) -> float:
    """`HANG_CHECK_INTERVAL_S`, lengthened to nodes / 1,024 s (1 s at 1,024 nodes, where the
    check walking 8,192 ranks ten times a second was 10% of the controller's CPU): a hang
    timeout is a minute by default, so a second more before a hang is declared is noise."""
    return max(HANG_CHECK_INTERVAL_S, nodes / 1024)


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
    positions: dict[int, StackPosition | None] = dataclasses.field(default_factory=dict)
    """rank -> where its main thread was, from the dumps."""
    dumps: dict[int, StackDump] = dataclasses.field(default_factory=dict)
    """rank -> its dump (NCCL's flight recorder summary among the rest)."""
    nodes: dict[int, str] = dataclasses.field(default_factory=dict)
    """rank -> the node whose agent dumped it (known even for a rank that never reported)."""
    declared: bool = False


class AttemptMonitor:
    """Health and progress watching for one attempt on `nodes`."""

    def __init__(
        self,
        health: HealthSpec,
        journal: Journal,
        attempt: int,
        nodes: tuple[str, ...],
        world_size: int,
        max_steps: int | None,
        send: Callable[[str, Message], bool],
        say: Callable[[str], None],
    ) -> None:
        self.health = health
        self.journal = journal
        self.attempt = attempt
        self.send = send
        self.say = say
        self.watch = ProgressWatch(health, nodes, world_size, max_steps)
        self._probes: dict[str, NodeVerdictRecord] = {}
        self._stragglers: dict[str, HealthVerdict] = {}
        self._hang: PendingHang | None = None
        self._last_straggler_check = 0.0
        self._last_hang_check = 0.0

    # -- feeding -------------------------------------------------------------------------------
    def node_started(self, node: str) -> None:
        self.watch.node_started(node, time.monotonic())

    def node_exited(self, node: str) -> None:
        self.watch.node_exited(node)

    def progress(self, node: str, ranks: dict[str, Heartbeat]) -> None:
        self.watch.record(node, ranks, time.monotonic())

    # -- health ------------------------------------------------------------------------------
    def _write_node_health(self, node: str) -> None:
        """Write ``nodes/<node>.json``: the latest probe verdict, merged with a straggler
        verdict while the node is flagged (worst of both, each kept in the evidence)."""
        probe = self._probes[node]
        straggler = self._stragglers.get(node)
        record = probe
        if straggler is not None and straggler.status is not Verdict.OK:
            merged = worst_of({"probe": probe.verdict, "progress": straggler})
            record = NodeVerdictRecord(node, "running", time.time(), merged)
        self.journal.write_node(node, record.to_dict())

    def verdict(self, node: str, record: NodeVerdictRecord) -> policy.NodeUnhealthy | None:
        """Take a verdict of a node in the attempt; an UNHEALTHY one is a node fault."""
        previous = self._probes.get(node)
        if previous is not None and previous.verdict.status is Verdict.UNHEALTHY:
            # UNHEALTHY sticks for the attempt: an XID is an event, delivered once, so the
            # next probe of the same broken GPU looks clean.
            return None
        self._probes[node] = record
        self._write_node_health(node)
        verdict = record.verdict
        changed = previous is None or previous.verdict.status is not verdict.status
        if record.phase == "preflight" or changed:
            when = "before joining" if record.phase == "preflight" else "probe while running"
            detail = "" if verdict.status is Verdict.OK else f": {verdict.reason}"
            data = NodeVerdictChanged(
                phase=record.phase, status=verdict.status.value, reason=verdict.reason
            )
            text = f"{node}: {verdict.status.value} ({when}){detail}"
            if verdict.status is Verdict.OK:  # routine: folded when thousands come at once
                self.journal.node_event(data, text, node)
            else:
                self.journal.event(data, text, node=node)
        if verdict.status is Verdict.UNHEALTHY:
            return policy.NodeUnhealthy(node, record.checked_at, record.phase, verdict.reason)
        if verdict.status is Verdict.DEGRADED and changed:
            self.say(f"{node} degraded: {verdict.reason}")
        return None

    def check_stragglers(self) -> None:
        watch = self.watch
        now = time.monotonic()
        if not watch.has_new_samples():
            return
        if now - self._last_straggler_check < straggler_check_interval(len(watch.nodes)):
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
            kind = Straggler if flagged else StragglerCleared
            self.journal.event(kind(**verdict.evidence), f"{node}: {verdict.reason}", node=node)
            if flagged:
                self.say(f"{node} degraded: {verdict.reason}")

    # -- hangs -------------------------------------------------------------------------------
    def check_hang(self, nodes: tuple[str, ...]) -> None:
        """Detect a hang once per attempt and ask every running agent for stack dumps."""
        if self._hang is not None:
            return
        now = time.monotonic()
        if now - self._last_hang_check < hang_check_interval(len(self.watch.nodes)):
            return
        self._last_hang_check = now
        watch = self.watch
        check = watch.check_hang(now)
        if check is None:
            return
        silent = ", ".join(
            f"rank {h.member} ({watch.node_of(h.member) or 'node unknown'}) {h.silent_s:.1f} s"
            for h in check.hung
        )
        self.journal.event(
            HangDetected(
                timeout_s=check.timeout.timeout_s,
                explanation=check.timeout.explanation,
                ranks=[
                    {
                        "rank": h.member,
                        "node": watch.node_of(h.member),
                        "step": watch.step_of(h.member),
                        "silent_s": h.silent_s,
                    }
                    for h in check.hung
                ],
            ),
            f"no progress within the hang timeout: {silent}; {check.timeout.explanation}; "
            "dumping the stacks of every rank",
        )
        self.say(f"hang detected ({check.timeout.explanation}): dumping stacks")
        awaiting = {
            node
            for node in nodes
            if node not in watch.exited and self.send(node, DumpStacks("hang"))
        }
        deadline = time.monotonic() + self.health.stack_dump_timeout_s
        self._hang = PendingHang(check, time.time(), deadline, awaiting)

    def stacks(self, node: str, dumps: tuple[StackDump, ...], duration_s: float) -> None:
        """Store a node's stack dumps (one file per rank) and note them for the hang."""
        hang = self._hang
        saved = []
        for dump in dumps:
            header = (
                f"# rank {dump.rank} (local rank {dump.local_rank}) on {node}, "
                f"pid {dump.pid}, process state {dump.state}\n"
                f"# method: {dump.method or 'none succeeded'}\n"
            )
            header += "".join(f"# failed: {failure}\n" for failure in dump.failures)
            if dump.nccl_seq is not None:
                header += (
                    f"# flight recorder: last collective enqueued #{dump.nccl_seq}, "
                    f"oldest not completed: {dump.nccl_pending or 'none'}\n"
                )
            if dump.flight_recorder:
                self.journal.write_job_file(
                    f"stacks/attempt-{self.attempt}/{node}-rank-{dump.rank}.flight_recorder.json",
                    dump.flight_recorder.encode(),
                )
            body = dump.text or "(no stacks could be read)\n"
            self.journal.write_job_file(
                f"stacks/attempt-{self.attempt}/{node}-rank-{dump.rank}.txt",
                (header + "\n" + body).encode(),
            )
            saved.append(f"rank {dump.rank}: {dump.method or 'no dump'}, state {dump.state}")
            if hang is not None:
                hang.states[dump.rank] = dump.state
                hang.positions[dump.rank] = stack_position(dump.text)
                hang.dumps[dump.rank] = dump
                hang.nodes[dump.rank] = node
        self.journal.event(
            StacksSaved(
                dumps=[
                    {
                        k: v
                        for k, v in dataclasses.asdict(d).items()
                        if k not in ("text", "flight_recorder")
                    }
                    for d in dumps
                ],
                duration_s=duration_s,
            ),
            f"{node}: {'; '.join(saved) or 'no worker processes found'}",
            node=node,
        )
        if hang is not None:
            hang.awaiting.discard(node)

    def declared_hang(self) -> policy.Hang | None:
        """Once every agent answered (or the deadline passed), the hang to observe."""
        hang, watch = self._hang, self.watch
        if hang is None or hang.declared:
            return None
        if hang.awaiting and time.monotonic() < hang.deadline:
            return None
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
                node=watch.node_of(rank) or hang.nodes.get(rank),
                step=watch.step_of(rank),
                silent_s=silent_s,
                process_state=hang.states.get(rank),
                position=hang.positions.get(rank),
                nccl_seq=hang.dumps[rank].nccl_seq if rank in hang.dumps else None,
                nccl_pending=hang.dumps[rank].nccl_pending if rank in hang.dumps else None,
            )
            for rank, silent_s in sorted(silence.items())
        )
        hang.declared = True
        timeout = hang.check.timeout
        return policy.Hang(hang.detected_at, timeout.timeout_s, timeout.explanation, ranks)
