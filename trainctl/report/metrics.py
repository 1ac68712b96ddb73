"""A job snapshot in Prometheus' exposition format, through `prometheus_client`.

`metric_families(snapshot)` is the one place that maps a `JobSnapshot` to metric families;
`SnapshotCollector` serves them from a `CollectorRegistry` of its own (never the global one):
the controller's ``/metrics`` (`serve_metrics`) and `trainctl metrics JOB` (`exposition`) both
go through it. Names follow Prometheus' conventions: base units (seconds, bytes, ratios),
``_total`` for counters, every series labelled with ``job_id`` (``job`` is Prometheus' own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from trainctl.report.live import JobSnapshot

HEALTH_STATES = ("OK", "DEGRADED", "UNHEALTHY", "unknown")
JOB_STATES = ("pending", "running", "recovering", "succeeded", "failed", "stopped", "cancelled")
PREFIX = "trainctl_"


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=["job_id", *labels])


def _summary(name: str, doc: str, job: str, values: tuple[float, ...]) -> SummaryMetricFamily:
    family = SummaryMetricFamily(PREFIX + name, doc, labels=["job_id"])
    family.add_metric([job], count_value=len(values), sum_value=sum(values))
    return family


def job_families(snap: JobSnapshot) -> Iterator[Metric]:
    """Job-wide series: state, goodput, ledger, steps, step times, checkpoints, restarts."""
    job = snap.job_id
    state = _gauge("job_state", "1 for the job's current state.", ("state",))
    for name in sorted({*JOB_STATES, snap.state}):
        state.add_metric([job, name], 1.0 if name == snap.state else 0.0)
    yield state
    goodput = _gauge("goodput_ratio", "Productive share of the job's wall time so far.")
    goodput.add_metric([job], snap.goodput or 0.0)
    yield goodput
    ledger = _gauge(
        "ledger_seconds", "Wall time so far per goodput ledger category.", ("category",)
    )
    for category, seconds in snap.ledger_seconds.items():
        ledger.add_metric([job, category], seconds)
    yield ledger
    wall = _gauge("wall_seconds", "The job's wall time so far.")
    wall.add_metric([job], snap.wall_s)
    yield wall
    steps = CounterMetricFamily(PREFIX + "steps", "Highest step completed.", labels=["job_id"])
    steps.add_metric([job], float(snap.step or 0))
    yield steps
    histogram = HistogramMetricFamily(
        PREFIX + "step_time_seconds",
        "Step times, one observation per rank per step (since the controller started).",
        labels=["job_id"],
    )
    histogram.add_metric(
        [job],
        [(bound, float(count)) for bound, count in snap.histogram.cumulative()],
        sum_value=snap.histogram.sum_s,
    )
    yield histogram
    checkpoints = snap.checkpoints
    yield _summary(
        "checkpoint_stall_seconds", "Training blocked per committed checkpoint save.", job,
        checkpoints.stalls_s,
    )  # fmt: skip
    yield _summary(
        "checkpoint_durable_seconds", "Save called to durable in storage, per checkpoint.", job,
        checkpoints.durable_s,
    )  # fmt: skip
    yield _summary(
        "checkpoint_restore_seconds", "Checkpoint restores.", job, checkpoints.restores_s
    )
    skipped = CounterMetricFamily(
        PREFIX + "checkpoint_memory_saves_skipped",
        "Memory-tier saves skipped (checkpoint.memory.slots: 1, replication behind).",
        labels=["job_id"],
    )
    skipped.add_metric([job], float(checkpoints.memory_saves_skipped))
    yield skipped
    committed = _gauge("checkpoint_committed_step", "Newest committed checkpoint's step.")
    if checkpoints.committed_step is not None:
        committed.add_metric([job], float(checkpoints.committed_step))
    yield committed
    age = _gauge("checkpoint_age_seconds", "Time since the newest checkpoint committed.")
    if snap.checkpoint_age_s is not None:
        age.add_metric([job], snap.checkpoint_age_s)
    yield age
    restarts = CounterMetricFamily(
        PREFIX + "restarts", "Relaunches by cause.", labels=["job_id", "cause"]
    )
    for cause, count in snap.restarts.items():
        restarts.add_metric([job, cause], float(count))
    yield restarts
    excluded = _gauge("excluded_nodes", "Nodes on the job's blocklist now.")
    excluded.add_metric([job], float(len(snap.excluded)))
    yield excluded


def node_families(snap: JobSnapshot) -> Iterator[Metric]:
    """Per-node series: health, step, step-time percentiles, heartbeat, flags, GPUs."""
    job = snap.job_id
    health = _gauge("node_health", "1 for the node's latest health verdict.", ("node", "status"))
    step = _gauge("node_step", "Highest step the node's ranks reported.", ("node",))
    quantiles = _gauge(
        "node_step_time_seconds", "Recent step time percentiles.", ("node", "quantile")
    )
    throughput = _gauge("node_steps_per_second", "Recent steps per second.", ("node",))
    beat = _gauge("node_heartbeat_age_seconds", "Time since the node's progress.", ("node",))
    straggler = _gauge("node_straggler", "1 while the node is flagged a straggler.", ("node",))
    silent = _gauge("node_silent", "1 while a running node sends no progress.", ("node",))
    gpu = _gauge("node_gpu_utilisation_ratio", "Mean GPU utilisation, recent window.", ("node",))
    memory = _gauge("node_gpu_memory_used_bytes", "GPU memory used, summed.", ("node",))
    total = _gauge("node_gpu_memory_total_bytes", "GPU memory, summed.", ("node",))
    for node in snap.nodes:
        name = node.name
        for status in HEALTH_STATES:
            health.add_metric([job, name, status], 1.0 if node.health == status else 0.0)
        straggler.add_metric([job, name], float(node.straggler))
        silent.add_metric([job, name], float(node.silent))
        pairs = (
            (step, node.step, ()),
            (quantiles, node.step_p50_s, ("0.5",)),
            (quantiles, node.step_p99_s, ("0.99",)),
            (throughput, node.steps_per_s, ()),
            (beat, node.heartbeat_age_s, ()),
            (gpu, None if node.gpu_util_pct is None else node.gpu_util_pct / 100, ()),
            (memory, node.gpu_memory_used_bytes, ()),
            (total, node.gpu_memory_total_bytes, ()),
        )
        for family, value, extra in pairs:
            if value is not None:
                family.add_metric([job, name, *extra], float(value))
    yield from (health, step, quantiles, throughput, beat, straggler, silent, gpu, memory, total)


def metric_families(snap: JobSnapshot) -> list[Metric]:
    """Every metric family of `snap`."""
    return [*job_families(snap), *node_families(snap)]


class SnapshotCollector(Collector):
    """Collects whatever snapshot `source` returns at scrape time (nothing while it is None)."""

    def __init__(self, source: Callable[[], JobSnapshot | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        if snap is not None:
            yield from metric_families(snap)


def registry_for(source: Callable[[], JobSnapshot | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry


def exposition(snap: JobSnapshot) -> str:
    """`snap` in the text exposition format (what ``/metrics`` answers)."""
    return generate_latest(registry_for(lambda: snap)).decode()


def serve_metrics(
    source: Callable[[], JobSnapshot | None], host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` from `source` on `host`:`port` (0: a free one; the bound port is
    ``server.server_address[1]``) in a daemon thread. Stop with ``server.shutdown()``."""
    return start_http_server(port, addr=host, registry=registry_for(source))
