"""GPU utilisation over time, judged purely: summaries per node and the idle-GPU flag.

The node agents sample every GPU every probe interval (`trainctl.health.nvml.GpuSampler`);
the controller stores the samples as a compact time series (``jobs/<id>/gpu/``). Everything
here is a function of those samples — no clock, no I/O — so the controller (which raises the
``gpu_idle`` event), `trainctl status`, `trainctl health JOB`, the goodput report and a
metrics exporter all see the same numbers.

The idle-GPU flag: over the last ``health.gpu_idle_window_s`` of samples taken while training
ran, a node whose GPUs' mean utilisation is below ``health.gpu_idle_util_pct`` while the
median of the job's other nodes is at or above it is flagged. A job whose GPUs all idle
(input stalls, a hang) flags no node: that is the job's problem, not one node's. It is a
warning: nothing is excluded for it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from trainctl.health.gpu_verdict import CLOCK_EVENT_REASONS
from trainctl.health.readings import UtilisationSample

RUNNING = "running"
"""The phase of samples taken while torchrun ran (the others: ``preflight``, ``standby``)."""
GPU_FLUSH_S = 15.0
"""The controller writes buffered samples at most this long after the oldest arrived, so a
stored chunk's rows predate its name by at most about this much."""
MIN_IDLE_SAMPLES = 2
"""Samples a node needs in the window before it is judged idle (one sample is a moment)."""


@dataclasses.dataclass(frozen=True)
class NodeSample:
    """One node's sample as the job store keeps it: which node, attempt and phase."""

    node: str
    attempt: int | None
    phase: str
    sample: UtilisationSample

    @property
    def time(self) -> float:
        return self.sample.time

    def to_json(self) -> dict[str, Any]:
        """The stored row: the sample's compact form plus node, attempt and phase."""
        return {"node": self.node, "attempt": self.attempt, "phase": self.phase} | (
            self.sample.to_compact()
        )

    @classmethod
    def from_json(cls, data: Any) -> NodeSample:
        """Read a stored row back; ValueError says what does not fit."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields = dict(data)
        node, attempt, phase = (
            fields.pop("node", None),
            fields.pop("attempt", None),
            fields.pop("phase", ""),
        )
        if not isinstance(node, str) or not node:
            raise ValueError("node: expected a node name")
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
            raise ValueError(f"attempt: expected an integer, got {attempt!r}")
        if not isinstance(phase, str):
            raise ValueError(f"phase: expected a string, got {phase!r}")
        return cls(node, attempt, phase, UtilisationSample.from_dict(fields))


def clock_reason_names(mask: int | None) -> list[str]:
    """The names of the clock event (throttle) reasons set in `mask`; unknown bits as hex."""
    if not mask:
        return []
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(unknown)] if unknown else [])


@dataclasses.dataclass(frozen=True)
class NodeUtilisation:
    """One node's GPU use over a window of samples. `None`: no GPU reported it."""

    node: str
    num_samples: int
    since: float
    until: float
    num_gpus: int
    """GPUs in the latest sample."""
    mean_util_pct: float | None
    """Mean of every GPU utilisation reading in the window."""
    min_util_pct: float | None
    """The least busy GPU at any moment of the window."""
    memory_used_bytes: int | None
    """Summed over the node's GPUs, in the latest sample that reported memory."""
    memory_total_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _memory(sample: UtilisationSample) -> tuple[int, int] | None:
    pairs = [
        (gpu.memory_used_bytes, gpu.memory_total_bytes)
        for gpu in sample.gpus
        if gpu.memory_used_bytes is not None and gpu.memory_total_bytes is not None
    ]
    if not pairs:
        return None
    return sum(used for used, _ in pairs), sum(total for _, total in pairs)


def summarise(
    samples: Iterable[NodeSample],
    window_s: float,
    until: float | None = None,
    phases: frozenset[str] | None = None,
) -> dict[str, NodeUtilisation]:
    """Per node, its GPU use over the `window_s` seconds up to `until` (default: the newest
    sample's time), counting only samples of `phases` (None: every phase)."""
    chosen = [s for s in samples if phases is None or s.phase in phases]
    if not chosen:
        return {}
    end = max(s.time for s in chosen) if until is None else until
    by_node: dict[str, list[NodeSample]] = {}
    for s in sorted(chosen, key=lambda s: s.time):
        if end - window_s <= s.time <= end:
            by_node.setdefault(s.node, []).append(s)
    summaries = {}
    for node, rows in sorted(by_node.items()):
        utils = [g.gpu_util_pct for r in rows for g in r.sample.gpus if g.gpu_util_pct is not None]
        memory = next((m for r in reversed(rows) if (m := _memory(r.sample)) is not None), None)
        summaries[node] = NodeUtilisation(
            node=node,
            num_samples=len(rows),
            since=rows[0].time,
            until=rows[-1].time,
            num_gpus=len(rows[-1].sample.gpus),
            mean_util_pct=round(statistics.fmean(utils), 1) if utils else None,
            min_util_pct=float(min(utils)) if utils else None,
            memory_used_bytes=None if memory is None else memory[0],
            memory_total_bytes=None if memory is None else memory[1],
        )
    return summaries


@dataclasses.dataclass(frozen=True)
class IdleFinding:
    """Whether one node's GPUs idled while the others were busy, with the numbers and why."""

    node: str
    idle: bool
    mean_util_pct: float
    min_util_pct: float | None
    others_util_pct: float
    """The median of the other judged nodes' mean utilisation (the lower middle value: at
    least half of them are at or above it)."""
    num_samples: int
    reason: str


def judge_idle(
    summaries: Mapping[str, NodeUtilisation],
    threshold_pct: float,
    min_samples: int = MIN_IDLE_SAMPLES,
) -> dict[str, IdleFinding]:
    """Judge every node with at least `min_samples` samples and a utilisation reading.

    Needs two such nodes (one node has nobody to be compared with) and a positive threshold
    (0 turns the flag off); otherwise judges nobody. Returns a finding per judged node.
    """
    judged = {
        node: s
        for node, s in summaries.items()
        if s.mean_util_pct is not None and s.num_samples >= min_samples
    }
    if threshold_pct <= 0 or len(judged) < 2:
        return {}
    findings = {}
    for node, summary in judged.items():
        mean = summary.mean_util_pct
        assert mean is not None
        others = statistics.median_low(
            s.mean_util_pct for n, s in judged.items() if n != node and s.mean_util_pct is not None
        )
        idle = mean < threshold_pct <= others
        over = f"mean over {summary.num_samples} samples"
        if idle:
            reason = (
                f"{node}: GPUs {mean:.1f}% busy ({over}, lowest {summary.min_util_pct:.0f}%) "
                f"while the other nodes run at {others:.1f}% (idle below {threshold_pct:g}%)"
            )
        elif mean < threshold_pct:
            reason = f"{node}: GPUs {mean:.1f}% busy, but so are the others ({others:.1f}%)"
        else:
            reason = f"{node}: GPUs {mean:.1f}% busy ({over})"
        findings[node] = IdleFinding(
            node, idle, mean, summary.min_util_pct, round(others, 1), summary.num_samples, reason
        )
    return findings
