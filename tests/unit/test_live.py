"""`trainctl top` and `trainctl metrics` on job stores built here (no job is launched): the
frame as a user sees it (a subprocess, NO_COLOR, fixed COLUMNS, a fixed clock) against its
golden file, the worst nodes of a 300-node job, the exposition parsed back with
`prometheus_client`'s parser and checked against the store, `--out` for the textfile
collector, `--metrics-port` on a taken port; and the pure parts (silence, ordering,
percentiles, histogram, the controller's progress recorder) as tables.

Regenerate the golden files after a deliberate change with TRAINCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import trainctl
from tests.unit.test_oncall_cli import check_golden
from trainctl.events import (
    AttemptStarted,
    CheckpointCommitted,
    CheckpointRestored,
    CheckpointSkipped,
    Event,
    FirstStep,
    JobCreated,
    NodeExcluded,
    Straggler,
)
from trainctl.health.readings import GpuUtilisation, NvmlStatus, UtilisationSample
from trainctl.health.utilisation import NodeSample
from trainctl.protocol import Heartbeat
from trainctl.recovery.journal import Journal
from trainctl.recovery.progress_recorder import ProgressRecorder
from trainctl.report.goodput import build_ledger
from trainctl.report.live import NodeView, is_silent, read_snapshot, worst_nodes
from trainctl.report.progress import (
    NodeProgress,
    ProgressView,
    StepHistogram,
    percentile,
    steps_per_second,
)
from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState, NodeRecord, NodeState
from trainctl.store import JobStore

JOB = "train-20261204-0001"
CREATED = 1764547200.0  # 2025-12-01T00:00:00Z
NOW = CREATED + 600
GIB = 1024**3


def node(name: str, state: NodeState, step: int | None) -> NodeRecord:
    record = NodeRecord(name)
    record.state, record.step = state, step
    return record


def progress(name: str, step: int, beat_ago: float, p50: float, p99: float) -> NodeProgress:
    return NodeProgress(name, 1, step, NOW - beat_ago, p50, p99, 1 / p50)


def gpu_row(name: str, util: int, used_gib: int) -> dict[str, object]:
    gpus = tuple(
        GpuUtilisation(
            index=i,
            gpu_util_pct=util,
            memory_used_bytes=used_gib * GIB,
            memory_total_bytes=80 * GIB,
        )
        for i in range(2)
    )
    sample = UtilisationSample(time=NOW - 5, status=NvmlStatus.AVAILABLE, gpus=gpus)
    return NodeSample(name, 1, "running", sample).to_json()


def write_running_job(store: JobStore) -> None:
    """A job in its second attempt: node-1 a straggler, node-2 silent for a minute, node-3
    excluded after attempt 0; one checkpoint committed, one restored, GPUs on two nodes."""
    record = JobRecord(JOB, "train", created_at=CREATED, updated_at=CREATED)
    record.state = JobState.RUNNING
    record.nodes = [
        node("node-0", NodeState.RUNNING, 120),
        node("node-1", NodeState.RUNNING, 118),
        node("node-2", NodeState.RUNNING, 97),
        node("node-3", NodeState.EXCLUDED, 40),
    ]
    first = AttemptRecord(0, CREATED + 1, AttemptState.FAILED, CREATED + 100, 3)
    first.nodes = ["node-0", "node-1", "node-3"]
    second = AttemptRecord(1, CREATED + 110, AttemptState.RUNNING, None, 3)
    second.nodes = ["node-0", "node-1", "node-2"]
    second.first_step, second.first_step_at = 51, CREATED + 140
    second.last_step, second.last_step_at = 120, NOW - 1
    record.attempts = [first, second]
    record.step, record.committed_step = 120, 100
    record.restarts = {"node_fault": 1}
    store.create(record, "name: train\n")
    events = [
        Event(CREATED, "train: 3 node(s) x 1 worker(s)", JobCreated(target="train.yaml")),
        Event(CREATED + 1, "attempt 0", AttemptStarted(nodes=first.nodes), attempt=0),
        Event(
            CREATED + 105,
            "node-3 excluded: XID 79",
            NodeExcluded(reason="XID 79", cause="node_fault", expires_at=CREATED + 1e9),
            node="node-3",
            attempt=0,
        ),
        Event(CREATED + 110, "attempt 1", AttemptStarted(nodes=second.nodes), attempt=1),
        Event(
            CREATED + 130,
            "restored step 50",
            CheckpointRestored(step=50, restore_s=3.0),
            node="node-0",
            attempt=1,
        ),
        Event(CREATED + 140, "first step 51", FirstStep(step=51), node="node-0", attempt=1),
        Event(
            CREATED + 500,
            "checkpoint step 100 committed",
            CheckpointCommitted(step=100, stall_s=0.5, durable_s=2.0),
            node="node-0",
            attempt=1,
        ),
        Event(CREATED + 560, "node-1: slowest node", Straggler(), node="node-1", attempt=1),
    ]
    for event in events:
        store.append_event(JOB, event)
    store.write_blocklist(
        JOB,
        {
            "node-3": {
                "reason": "XID 79",
                "cause": "node_fault",
                "since": CREATED + 105,
                "expires_at": CREATED + 1e9,
            }
        },
    )
    for name, status in (("node-0", "OK"), ("node-1", "DEGRADED"), ("node-3", "UNHEALTHY")):
        store.write_node(JOB, name, {"node": name, "status": status, "reason": ""})
    store.write_gpu_chunk(JOB, [gpu_row("node-0", 91, 58), gpu_row("node-1", 40, 30)], NOW - 4)
    view = ProgressView(
        {
            "node-0": progress("node-0", 120, 1, 0.25, 0.31),
            "node-1": progress("node-1", 118, 1, 0.40, 0.55),
            "node-2": progress("node-2", 97, 60, 0.26, 0.30),
        },
        StepHistogram().observe([0.25] * 50 + [0.4] * 20 + [3.0]),
    )
    store.write_progress_chunk(JOB, view.to_rows(), NOW - 1)


@pytest.fixture
def running_job(storage: Path) -> JobStore:
    store = JobStore(str(storage))
    write_running_job(store)
    return store


# -- top -------------------------------------------------------------------------------------
def test_top_once_golden_flags_silent_and_straggler_nodes(
    running_job: JobStore, storage: Path
) -> None:
    result = trainctl("top", JOB[:9], "--once", "--at", str(NOW), storage=storage, COLUMNS="100")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_golden("top-once.txt", result.stdout)
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line[:5] == "node-"}
    assert rows["node-2"].rstrip().endswith("SILENT")
    assert rows["node-1"].rstrip().endswith("STRAGGLER")
    assert "EXCLUDED" in rows["node-3"] and "SILENT" not in rows["node-0"]


def test_top_with_hundreds_of_nodes_shows_counts_and_the_worst(storage: Path) -> None:
    store = JobStore(str(storage))
    record = JobRecord(JOB, "big", created_at=CREATED, updated_at=CREATED, state=JobState.RUNNING)
    record.nodes = [node(f"n{i:03d}", NodeState.RUNNING, 10) for i in range(300)]
    record.attempts = [AttemptRecord(0, CREATED + 1, AttemptState.RUNNING, None, 300)]
    store.create(record, "name: big\n")
    nodes = {f"n{i:03d}": progress(f"n{i:03d}", 10, 1, 0.1 + i / 10_000, 0.2) for i in range(300)}
    nodes["n150"] = progress("n150", 7, 90, 0.1, 0.2)  # silent
    store.write_progress_chunk(JOB, ProgressView(nodes, StepHistogram()).to_rows(), NOW)
    result = trainctl("top", JOB, "--once", "--nodes", "5", "--at", str(NOW), storage=storage)
    assert result.returncode == 0, result.stderr
    shown = [line.split()[0] for line in result.stdout.splitlines() if line[1:4].isdigit()]
    assert shown[0] == "n150", "the silent node comes first"
    assert shown[1:5] == ["n299", "n298", "n297", "n296"], "then the slowest"
    assert "300 nodes: 300 running" in result.stdout and "1 silent" in result.stdout
    assert "worst 5 of 300 nodes shown" in result.stdout


def test_top_unknown_job_is_one_message(storage: Path) -> None:
    result = trainctl("top", "nope", "--once", storage=storage)
    assert result.returncode == 2
    assert "no such job" in result.stderr and "Traceback" not in result.stderr


# -- metrics ---------------------------------------------------------------------------------
def parse(text: str) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """metric family -> (type, {sorted labels without job_id -> value}) of every sample."""
    families: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, (family.type, {}))[1]
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "job_id"}
            samples[(("__name__", sample.name), *sorted(labels.items()))] = sample.value
    return families


def value(families: dict, family: str, name: str | None = None, **labels: str) -> float:
    key = (("__name__", name or family), *sorted(labels.items()))
    return families[family][1][key]


def test_metrics_from_the_store_parse_and_match_it(running_job: JobStore, storage: Path) -> None:
    # Memory saves skipped on two nodes (counted), a durable save skipped (not counted).
    for name, count in (("node-0", 3), ("node-1", 2)):
        skipped = CheckpointSkipped(step=115, reason="lag", tier="memory", skipped=count)
        running_job.append_event(
            JOB, Event(CREATED + 570, "skipped", skipped, node=name, attempt=1)
        )
    durable = CheckpointSkipped(step=110, reason="already committed")
    running_job.append_event(JOB, Event(CREATED + 571, "skipped", durable, node="node-0"))
    result = trainctl("metrics", JOB, storage=storage)
    assert result.returncode == 0, result.stderr
    families = parse(result.stdout)
    series = [line for line in result.stdout.splitlines() if line.startswith("trainctl_")]
    assert series and all(f'job_id="{JOB}"' in line for line in series)
    types = {name: kind for name, (kind, _) in families.items()}
    assert types["trainctl_steps"] == "counter"
    assert types["trainctl_restarts"] == "counter"
    assert types["trainctl_step_time_seconds"] == "histogram"
    assert types["trainctl_checkpoint_stall_seconds"] == "summary"
    assert types["trainctl_goodput_ratio"] == "gauge"
    assert value(families, "trainctl_steps", "trainctl_steps_total") == 120
    assert value(families, "trainctl_restarts", "trainctl_restarts_total", cause="node_fault") == 1
    assert value(families, "trainctl_excluded_nodes") == 1
    assert value(families, "trainctl_job_state", state="running") == 1
    assert value(families, "trainctl_job_state", state="succeeded") == 0
    record = running_job.read_state(JOB)
    events = running_job.read_events(JOB).events
    ledger = build_ledger(record, events, 0.0)  # goodput so far: compare shares, not seconds
    assert 0 < value(families, "trainctl_goodput_ratio") <= 1
    assert set(ledger.seconds) == {
        dict(key)["category"] for key in families["trainctl_ledger_seconds"][1]
    }
    stall = "trainctl_checkpoint_stall_seconds"
    assert value(families, stall, stall + "_count") == 1
    assert value(families, stall, stall + "_sum") == 0.5
    restore = "trainctl_checkpoint_restore_seconds"
    assert value(families, restore, restore + "_sum") == 3.0
    assert value(families, "trainctl_checkpoint_committed_step") == 100
    skipped = "trainctl_checkpoint_memory_saves_skipped"
    assert types[skipped] == "counter"
    assert value(families, skipped, skipped + "_total") == 5
    hist = "trainctl_step_time_seconds"
    assert value(families, hist, hist + "_count") == 71
    assert value(families, hist, hist + "_bucket", le="0.25") == 50
    assert value(families, hist, hist + "_bucket", le="2.5") == 70
    assert value(families, hist, hist + "_bucket", le="+Inf") == 71
    health = "trainctl_node_health"
    assert value(families, health, node="node-3", status="UNHEALTHY") == 1
    assert value(families, health, node="node-2", status="unknown") == 1
    assert value(families, "trainctl_node_silent", node="node-2") == 1
    assert value(families, "trainctl_node_straggler", node="node-1") == 1
    assert value(families, "trainctl_node_gpu_utilisation_ratio", node="node-0") == 0.91
    assert value(families, "trainctl_node_gpu_memory_used_bytes", node="node-1") == 60 * GIB
    quantiles = "trainctl_node_step_time_seconds"
    assert value(families, quantiles, node="node-1", quantile="0.99") == 0.55
    assert ("node", "node-2") not in {
        item for key in families["trainctl_node_gpu_utilisation_ratio"][1] for item in key
    }, "no GPU series where none was reported"


def test_metrics_out_writes_a_whole_file(
    running_job: JobStore, storage: Path, tmp_path: Path
) -> None:
    out = tmp_path / "textfile" / "train.prom"
    out.parent.mkdir()
    result = trainctl("metrics", JOB, "--out", str(out), storage=storage)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert [p.name for p in out.parent.iterdir()] == ["train.prom"], "no temporary file left"
    assert "trainctl_steps_total" in out.read_text()
    missing = trainctl("metrics", JOB, "--out", str(tmp_path / "nope" / "x.prom"), storage=storage)
    assert missing.returncode == 2
    assert "--out" in missing.stderr and "Traceback" not in missing.stderr


def test_metrics_port_taken_is_refused_before_anything_starts(storage: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-gpt.yaml")
        result = trainctl(
            "launch", recipe, "--job-id", "m1", "--metrics-port", port, storage=storage
        )
    assert result.returncode == 2, result.stderr
    assert "--metrics-port" in result.stderr and "Traceback" not in result.stderr
    assert not (storage / "jobs" / "m1").exists(), "no job was created"


def test_metrics_port_is_refused_with_slurm(storage: Path) -> None:
    result = trainctl(
        "launch", "recipes/tiny-gpt.yaml", "--scheduler", "slurm", "--metrics-port", "9100",
        storage=storage,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--metrics-port" in result.stderr and "trainctl metrics JOB" in result.stderr
    assert "Traceback" not in result.stderr and not (storage / "jobs").exists()


# -- pure parts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("running", "age", "p50", "silent"),
    [
        (True, None, None, False),  # never reported: starting, not silent
        (True, 14.0, 0.1, False),
        (True, 16.0, 0.1, True),
        (True, 16.0, 2.0, False),  # slow steps: 10 x 2 s allowed
        (True, 21.0, 2.0, True),
        (False, 600.0, 0.1, False),  # not running: nothing to hear
    ],
)
def test_is_silent(running: bool, age: float | None, p50: float | None, silent: bool) -> None:
    assert is_silent(running, age, p50) is silent


def view(name: str, **fields: object) -> NodeView:
    defaults: dict[str, object] = dict(
        state="running", health="OK", health_reason="", step=1, step_p50_s=0.1, step_p99_s=0.1,
        steps_per_s=10.0, gpu_util_pct=None, gpu_memory_used_bytes=None,
        gpu_memory_total_bytes=None, heartbeat_age_s=1.0, straggler=False, silent=False,
        excluded=False,
    )  # fmt: skip
    return NodeView(name=name, **{**defaults, **fields})  # type: ignore[arg-type]


def test_worst_nodes_order() -> None:
    nodes = [
        view("fast"),
        view("slow", step_p50_s=0.5),
        view("strag", straggler=True),
        view("sick", health="UNHEALTHY"),
        view("quiet", silent=True),
        view("degraded", health="DEGRADED"),
        view("done", state="succeeded", step_p50_s=9.0),
    ]
    order = [n.name for n in worst_nodes(nodes, 7)]
    assert order == ["quiet", "sick", "strag", "degraded", "slow", "fast", "done"]
    assert [n.name for n in worst_nodes(nodes, 2)] == ["quiet", "sick"]


def test_percentiles_throughput_histogram() -> None:
    assert percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99
    assert percentile([3.0], 0.99) == 3.0
    assert steps_per_second([(0.0, 10)]) is None
    assert steps_per_second([(0.0, 10), (5.0, 20)]) == 2.0
    histogram = StepHistogram((0.1, 1.0)).observe([0.05, 0.1, 0.5, 7.0])
    assert histogram.counts == (2, 1, 1) and histogram.count == 4 and histogram.sum_s == 7.65
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert StepHistogram.from_json(histogram.to_json()) == histogram
    rows = ProgressView({"a": progress("a", 3, 1, 0.2, 0.3)}, histogram).to_rows()
    back, problems = ProgressView.from_rows([*rows, {"type": "node", "node": "x"}])
    assert back.nodes == {"a": progress("a", 3, 1, 0.2, 0.3)} and back.histogram == histogram
    assert len(problems) == 1 and "row 3" in problems[0]


def test_a_node_row_holds_every_field_of_its_progress() -> None:
    """`NodeProgress.to_json` names its fields one by one: a field added later must be too."""
    row = progress("a", 3, 1, 0.2, 0.3).to_json()
    assert set(row) == {"type", *(f.name for f in dataclasses.fields(NodeProgress))}
    saving = dataclasses.replace(progress("a", 3, 1, 0.2, 0.3), saving=True)
    assert NodeProgress.from_json(saving.to_json()) == saving


def test_progress_recorder_counts_each_step_once_and_writes_whole_views(storage: Path) -> None:
    store = JobStore(str(storage))
    record = JobRecord(JOB, "t", created_at=CREATED, updated_at=CREATED)
    store.create(record, "name: t\n")
    recorder = ProgressRecorder(Journal(store, record), flush_s=2.0)
    beat = Heartbeat(step=2, samples=((1, 0.2, None), (2, 0.4, None)))
    recorder.add("node-0", 0, {"0": beat, "1": beat}, now=CREATED)
    recorder.add("node-0", 0, {"0": beat}, now=CREATED + 1)  # the same beat again: no new sample
    recorder.tick(CREATED + 1)
    recorder.add("node-1", 0, {"2": Heartbeat(step=3, step_time=0.3)}, now=CREATED + 1.5)
    recorder.tick(CREATED + 2)  # within flush_s of the first write: not yet
    assert len(list((storage / "jobs" / JOB / "progress").iterdir())) == 1
    recorder.tick(CREATED + 3.5)
    recorder.tick(CREATED + 9)  # nothing changed: nothing written
    assert len(list((storage / "jobs" / JOB / "progress").iterdir())) == 2
    rows, problems = store.read_progress_rows(JOB)
    stored, bad = ProgressView.from_rows(rows)
    assert problems == [] and bad == []
    assert stored.histogram.count == 5 and stored.histogram.sum_s == pytest.approx(1.5)
    assert stored.nodes["node-0"].step == 2 and stored.nodes["node-0"].step_p50_s == 0.2
    assert stored.nodes["node-0"].step_p99_s == 0.4
    assert stored.nodes["node-0"].steps_per_s == 0.0  # step 2 at both reports
    assert stored.nodes["node-1"].beat_at == CREATED + 1.5
    snapshot, _ = read_snapshot(store, JOB, CREATED + 10)
    assert snapshot.histogram == stored.histogram
