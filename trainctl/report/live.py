"""One snapshot of a job as it runs: what `trainctl top` draws and `trainctl metrics` (and the
controller's ``/metrics``) expose.

`build_snapshot(inputs, now)` is pure: the job's record, events, node verdicts, blocklist, GPU
summaries and progress view in, a frozen `JobSnapshot` out. Two ways to gather the inputs:
`read_snapshot(store, job_id, now)` from the store alone (no server), and the controller's
own memory (`trainctl.recovery.live_view`). Time is always passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from trainctl.checkpoint.memory import MEMORY_TIER
from trainctl.event_reader import EventFollower
from trainctl.events import CheckpointCommitted, CheckpointRestored, CheckpointSkipped, Event
from trainctl.health.utilisation import NodeUtilisation
from trainctl.report.goodput import LEDGER_KINDS, build_ledger
from trainctl.report.gpu import read_gpu_series, stored_health
from trainctl.report.progress import ProgressView, StepHistogram
from trainctl.state import JobRecord, JobState, NodeState
from trainctl.store import JobStore, Problem

SILENT_FLOOR_S = 15.0
"""A running node is silent once no progress arrived for this long..."""
SILENT_STEP_FACTOR = 10.0
"""...or for this many of its median step times, whichever is longer."""
RECENT_EVENTS = 8
"""How many of the latest events a snapshot keeps."""
HEALTH_RANK = {"UNHEALTHY": 0, "DEGRADED": 1, "unknown": 2, "OK": 3}


SNAPSHOT_KINDS = LEDGER_KINDS | {CheckpointSkipped.KIND}
"""The event kinds whose data a snapshot reads (the ledger's and the memory tier's skips)."""


@dataclasses.dataclass(frozen=True)
class NodeView:
    """One node as `top` shows it. None: not known (yet)."""

    name: str
    state: str
    health: str
    """OK, DEGRADED, UNHEALTHY (its latest verdict), or unknown."""
    health_reason: str
    step: int | None
    step_p50_s: float | None
    step_p99_s: float | None
    steps_per_s: float | None
    gpu_util_pct: float | None
    gpu_memory_used_bytes: int | None
    gpu_memory_total_bytes: int | None
    heartbeat_age_s: float | None
    straggler: bool
    silent: bool
    excluded: bool

    def markers(self) -> list[str]:
        """Words that flag the node (shown as text, so they survive NO_COLOR)."""
        flags = [
            ("SILENT", self.silent),
            ("STRAGGLER", self.straggler),
            ("UNHEALTHY", self.health == "UNHEALTHY"),
            ("DEGRADED", self.health == "DEGRADED" and not self.straggler),
            ("EXCLUDED", self.excluded),
        ]
        return [word for word, on in flags if on]


@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """Checkpoint saves and restores so far, from the events."""

    committed_step: int | None
    last_committed_at: float | None
    stalls_s: tuple[float, ...]
    """Training blocked per committed save."""
    durable_s: tuple[float, ...]
    """Save called -> durable in storage, per committed save that says."""
    restores_s: tuple[float, ...]
    memory_saves_skipped: int = 0
    """Memory-tier saves skipped (``checkpoint.memory.slots: 1``: replication lagged)."""


@dataclasses.dataclass(frozen=True)
class JobSnapshot:
    job_id: str
    name: str
    state: str
    reason: str
    now: float
    attempt: int | None
    step: int | None
    nodes: tuple[NodeView, ...]
    events: tuple[Event, ...]
    """The latest `RECENT_EVENTS` events, oldest first."""
    goodput: float | None
    ledger_seconds: dict[str, float]
    """Wall time so far per goodput ledger category."""
    wall_s: float
    checkpoints: CheckpointStats
    restarts: dict[str, int]
    excluded: tuple[str, ...]
    """Nodes on the blocklist now."""
    histogram: StepHistogram

    @property
    def live(self) -> bool:
        return self.state in (JobState.RUNNING.value, JobState.RECOVERING.value)

    @property
    def checkpoint_age_s(self) -> float | None:
        last = self.checkpoints.last_committed_at
        return None if last is None else max(0.0, self.now - last)


@dataclasses.dataclass(frozen=True)
class SnapshotInputs:
    record: JobRecord
    events: Sequence[Event]
    verdicts: Mapping[str, Mapping[str, Any]]
    """node -> its ``nodes/<node>.json`` document."""
    blocklist: Mapping[str, Mapping[str, Any]]
    """node -> its blocklist entry (``expires_at`` among the fields)."""
    gpu: Mapping[str, NodeUtilisation]
    progress: ProgressView


def is_silent(running: bool, heartbeat_age_s: float | None, step_p50_s: float | None) -> bool:
    """A running node whose progress stopped arriving for longer than `SILENT_FLOOR_S` or
    `SILENT_STEP_FACTOR` median steps. A node that never reported is starting, not silent."""
    if not running or heartbeat_age_s is None:
        return False
    return heartbeat_age_s > max(SILENT_FLOOR_S, SILENT_STEP_FACTOR * (step_p50_s or 0.0))


def stragglers(events: Sequence[Event], attempt: int | None) -> set[str]:
    """Nodes flagged as stragglers in `attempt` and not cleared since."""
    flagged: set[str] = set()
    for event in events:
        if event.attempt != attempt or event.node is None:
            continue
        if event.kind == "straggler":
            flagged.add(event.node)
        elif event.kind == "straggler_cleared":
            flagged.discard(event.node)
    return flagged


def checkpoint_stats(record: JobRecord, events: Sequence[Event]) -> CheckpointStats:
    commits = [e for e in events if isinstance(e.data, CheckpointCommitted)]
    restores = [e for e in events if isinstance(e.data, CheckpointRestored)]
    skips = [
        e.data.skipped or 1
        for e in events
        if isinstance(e.data, CheckpointSkipped) and e.data.tier == MEMORY_TIER
    ]
    return CheckpointStats(
        committed_step=record.committed_step,
        last_committed_at=commits[-1].time if commits else None,
        stalls_s=tuple(float(e.data.stall_s) for e in commits),
        durable_s=tuple(float(e.data.durable_s) for e in commits if e.data.durable_s is not None),
        restores_s=tuple(float(e.data.restore_s) for e in restores if e.data.restore_s is not None),
        memory_saves_skipped=sum(skips),
    )


def _node_view(
    node: Any, inputs: SnapshotInputs, flagged: set[str], excluded: set[str], now: float, live: bool
) -> NodeView:
    name = node.name
    progress = inputs.progress.nodes.get(name)
    verdict = inputs.verdicts.get(name) or {}
    usage = inputs.gpu.get(name)
    age = None if progress is None else max(0.0, now - progress.beat_at)
    p50 = progress.step_p50_s if progress else None
    running = live and node.state == NodeState.RUNNING
    steps = [s for s in (node.step, progress.step if progress else None) if s is not None]
    return NodeView(
        name=name,
        state=node.state.value,
        health=str(verdict.get("status") or "unknown"),
        health_reason=str(verdict.get("reason") or ""),
        step=max(steps) if steps else None,
        step_p50_s=p50,
        step_p99_s=progress.step_p99_s if progress else None,
        steps_per_s=progress.steps_per_s if progress and running else None,
        gpu_util_pct=usage.mean_util_pct if usage else None,
        gpu_memory_used_bytes=usage.memory_used_bytes if usage else None,
        gpu_memory_total_bytes=usage.memory_total_bytes if usage else None,
        heartbeat_age_s=age,
        straggler=running and name in flagged,
        silent=is_silent(running, age, p50),
        excluded=name in excluded or node.state == NodeState.EXCLUDED,
    )


def build_snapshot(inputs: SnapshotInputs, now: float) -> JobSnapshot:
    """The job at `now`, from its parts. Pure."""
    record = inputs.record
    attempt = record.attempts[-1].number if record.attempts else None
    live = record.state in (JobState.RUNNING, JobState.RECOVERING)
    flagged = stragglers(inputs.events, attempt)
    excluded = {
        node
        for node, entry in inputs.blocklist.items()
        if float(entry.get("expires_at", 0.0) or 0.0) > now
    }
    nodes = tuple(_node_view(n, inputs, flagged, excluded, now, live) for n in record.nodes)
    ledger = build_ledger(record, inputs.events, now)
    return JobSnapshot(
        job_id=record.job_id,
        name=record.name,
        state=record.state.value,
        reason=record.reason,
        now=now,
        attempt=attempt,
        step=record.step,
        nodes=nodes,
        events=tuple(inputs.events[-RECENT_EVENTS:]),
        goodput=ledger.goodput if ledger.wall_s > 0 else None,
        ledger_seconds=ledger.seconds,
        wall_s=ledger.wall_s,
        checkpoints=checkpoint_stats(record, inputs.events),
        restarts=dict(sorted(record.restarts.items())),
        excluded=tuple(sorted(excluded)),
        histogram=inputs.progress.histogram,
    )


def badness(node: NodeView) -> tuple[int, int, float, str]:
    """Sort key, worst first: silent, unhealthy, straggler, degraded, unknown, then the
    slowest median step."""
    if node.silent:
        rank = 0
    elif node.health == "UNHEALTHY":
        rank = 1
    elif node.straggler:
        rank = 2
    else:
        rank = 3 + HEALTH_RANK.get(node.health, 2)
    return (rank, 0 if node.state == "running" else 1, -(node.step_p50_s or 0.0), node.name)


def worst_nodes(nodes: Sequence[NodeView], k: int) -> list[NodeView]:
    """The `k` nodes an on-call engineer should look at first (`badness`)."""
    return sorted(nodes, key=badness)[:k]


def count_by(nodes: Sequence[NodeView], field: str) -> dict[str, int]:
    """How many nodes have each value of `field` (state, health), most common first."""
    counts: dict[str, int] = {}
    for node in nodes:
        value = str(getattr(node, field))
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def read_snapshot(
    store: JobStore, job_id: str, now: float, follower: EventFollower | None = None
) -> tuple[JobSnapshot, list[Problem]]:
    """The job's snapshot from the store alone; the stored files that were skipped.

    `follower`: the events as read so far by the caller's earlier snapshots (`top` refreshes:
    only new event files are read); without one every event file is read, once. Only the
    kinds the snapshot interprets (`SNAPSHOT_KINDS`) are validated against their schema."""
    record = store.read_state(job_id)
    log = (follower or EventFollower(store, job_id, SNAPSHOT_KINDS)).read()
    verdicts, verdict_problems = store.read_node_verdicts(job_id)
    health = stored_health(store, job_id)
    series = read_gpu_series(store, job_id, last_s=health.gpu_idle_window_s)
    rows, progress_problems = store.read_progress_rows(job_id)
    progress, bad_rows = ProgressView.from_rows(rows)
    problems = [*log.problems, *verdict_problems, *series.problems, *progress_problems]
    problems += [Problem(f"{store.job_url(job_id)}/progress", text) for text in bad_rows]
    inputs = SnapshotInputs(
        record=record,
        events=log.events,
        verdicts=verdicts,
        blocklist=store.read_blocklist(job_id),
        gpu=series.summaries(health.gpu_idle_window_s),
        progress=progress,
    )
    return build_snapshot(inputs, now), problems
