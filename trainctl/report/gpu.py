"""A job's GPU utilisation from the store, at every layer: per GPU, per node, per attempt,
over time.

`read_gpu_series(store, job_id)` is the one way in — `trainctl status`, `trainctl health JOB`,
the goodput report and a metrics exporter all start from it. Everything past the read is pure
(`GpuSeries` methods, `gpu_timeline`), built on `trainctl.health.utilisation`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from trainctl.health.utilisation import (
    GPU_FLUSH_S,
    RUNNING,
    IdleFinding,
    NodeSample,
    NodeUtilisation,
    clock_reason_names,
    judge_idle,
    summarise,
)
from trainctl.spec import HealthSpec
from trainctl.store import JobStore, Problem


@dataclasses.dataclass(frozen=True)
class GpuSeries:
    """A job's stored GPU samples (oldest first) and the stored rows that could not be read."""

    samples: list[NodeSample]
    problems: list[Problem]

    def latest(self) -> dict[str, NodeSample]:
        """Each node's newest sample (any phase), by node name."""
        latest: dict[str, NodeSample] = {}
        for sample in self.samples:
            if sample.node not in latest or sample.time >= latest[sample.node].time:
                latest[sample.node] = sample
        return dict(sorted(latest.items()))

    def summaries(self, window_s: float) -> dict[str, NodeUtilisation]:
        """Per node, its GPU use over the last `window_s` seconds of samples taken while
        training ran (every phase when none was: a job that never started training)."""
        running = summarise(self.samples, window_s, phases=frozenset({RUNNING}))
        return running or summarise(self.samples, window_s)

    def idle(self, health: HealthSpec) -> dict[str, IdleFinding]:
        """The idle-GPU judgement the controller makes, over the same last window."""
        running = summarise(self.samples, health.gpu_idle_window_s, phases=frozenset({RUNNING}))
        return judge_idle(running, health.gpu_idle_util_pct)


def read_gpu_series(store: JobStore, job_id: str, last_s: float | None = None) -> GpuSeries:
    """The job's GPU samples: all, or (`last_s`) about the last `last_s` seconds of them.

    Rows that do not fit are listed as problems (the caller warns), never guessed at."""
    slack = None if last_s is None else last_s + GPU_FLUSH_S
    rows, problems = store.read_gpu_rows(job_id, last_s=slack)
    samples = []
    for number, row in enumerate(rows, 1):
        try:
            samples.append(NodeSample.from_json(row))
        except ValueError as bad:
            problems.append(Problem(f"{store.job_url(job_id)}/gpu", f"row {number}: {bad}"))
    samples.sort(key=lambda s: s.time)
    return GpuSeries(samples, problems)


def stored_health(store: JobStore, job_id: str) -> HealthSpec:
    """The job's ``health:`` settings from its stored spec; the defaults where it has none or
    they do not validate (showing GPU use must not fail on them)."""
    text = store.read_spec_text(job_id)
    try:
        data = yaml.safe_load(text) if text else None
        section = data.get("health") if isinstance(data, dict) else None
        return HealthSpec.model_validate(section or {})
    except (yaml.YAMLError, ValidationError):
        return HealthSpec()


def node_usage_json(
    summary: NodeUtilisation | None, idle: IdleFinding | None
) -> dict[str, Any] | None:
    """A node's ``gpu`` object in `status --json`: the window's summary and its idle flag."""
    if summary is None:
        return None
    data = summary.to_json()
    data["idle"] = None if idle is None or not idle.idle else dataclasses.asdict(idle)
    return data


def gpu_readings_json(sample: NodeSample) -> dict[str, Any]:
    """A node's latest per-GPU readings for `health JOB --json`: the stored sample, with the
    clock event reasons decoded to names."""
    data = sample.to_json()
    for gpu in data["gpus"]:
        gpu["clock_event_reason_names"] = clock_reason_names(gpu.get("clock_event_reasons"))
    return data


# -- over time (the goodput report) -----------------------------------------------------------


def bucket_size(wall_s: float, most: int = 24) -> float:
    """A round bucket length that cuts `wall_s` into at most `most` buckets."""
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400):
        if wall_s / step <= most:
            return float(step)
    return float(86400 * max(1, round(wall_s / 86400 / most)))


def _mean(values: Sequence[int]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def gpu_timeline(
    samples: Sequence[NodeSample], start: float, end: float, bucket_s: float | None = None
) -> dict[str, Any]:
    """GPU utilisation over time: per node, the mean utilisation of each `bucket_s` bucket
    from `start` (None where the node reported none), and per attempt per node the mean and
    lowest reading and the number of samples. JSON-ready."""
    wall = max(end - start, 0.0)
    size = bucket_s or bucket_size(wall)
    count = max(1, int(wall // size) + 1)
    buckets: dict[str, list[list[int]]] = {}
    attempts: dict[str, dict[str, list[int]]] = {}
    for s in samples:
        utils = [g.gpu_util_pct for g in s.sample.gpus if g.gpu_util_pct is not None]
        if not utils:
            continue
        index = int((s.time - start) // size)
        if 0 <= index < count:
            buckets.setdefault(s.node, [[] for _ in range(count)])[index] += utils
        if s.phase == RUNNING and s.attempt is not None:
            attempts.setdefault(str(s.attempt), {}).setdefault(s.node, []).extend(utils)
    return {
        "start": start,
        "bucket_s": size,
        "nodes": {
            node: [_mean(values) for values in rows] for node, rows in sorted(buckets.items())
        },
        "attempts": {
            number: {
                node: {"mean_util_pct": _mean(u), "min_util_pct": min(u), "num_readings": len(u)}
                for node, u in sorted(nodes.items())
            }
            for number, nodes in sorted(attempts.items(), key=lambda item: int(item[0]))
        },
    }
