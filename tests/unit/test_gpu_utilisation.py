"""GPU utilisation: the pure summaries and idle-GPU judgement (table tests), the stored time
series (a real JobStore), the controller's recorder (a real Journal), the protocol message,
and `status` / `health JOB` / `report` run as a user would on a synthetic store."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, S3Endpoint, sealed_env
from trainctl.health.readings import GpuUtilisation, NvmlStatus, ProbeError, UtilisationSample
from trainctl.health.utilisation import (
    NodeSample,
    NodeUtilisation,
    clock_reason_names,
    judge_idle,
    summarise,
)
from trainctl.protocol import (
    AGENT_MESSAGES,
    Envelope,
    GpuUsage,
    ProtocolError,
    decode_line,
    encode_line,
)
from trainctl.recovery.gpu_recorder import GpuRecorder
from trainctl.recovery.journal import Journal
from trainctl.report.gpu import bucket_size, gpu_timeline, read_gpu_series
from trainctl.state import JobRecord, JobState, NodeRecord
from trainctl.store import JobStore

GIB = 1024**3


def sample(
    t: float, *utils: int | None, used_gib: int = 60, total_gib: int = 80
) -> UtilisationSample:
    gpus = tuple(
        GpuUtilisation(
            index=i,
            gpu_util_pct=u,
            memory_used_bytes=used_gib * GIB,
            memory_total_bytes=total_gib * GIB,
        )
        for i, u in enumerate(utils)
    )
    return UtilisationSample(t, NvmlStatus.AVAILABLE, gpus)


def row(
    node: str, t: float, *utils: int | None, phase: str = "running", attempt: int = 0
) -> NodeSample:
    return NodeSample(node, attempt, phase, sample(t, *utils))


def usage(
    node: str, mean: float | None, num_samples: int = 5, low: float | None = None
) -> NodeUtilisation:
    return NodeUtilisation(
        node, num_samples, 0.0, 10.0, 8, mean, low if low is not None else mean, None, None
    )


# -- the pure parts -------------------------------------------------------------------------------


def test_summary_is_mean_and_min_over_the_window_ending_at_the_newest_sample() -> None:
    rows = [
        row("n0", 0, 10, 10),  # outside the 20 s window ending at t=30
        row("n0", 20, 90, 80),
        row("n0", 30, 100, 70),
        row("n1", 25, 5, 1, phase="preflight"),
    ]
    summaries = summarise(rows, window_s=20, phases=frozenset({"running"}))
    assert list(summaries) == ["n0"]
    n0 = summaries["n0"]
    assert (n0.num_samples, n0.since, n0.until, n0.num_gpus) == (2, 20, 30, 2)
    assert (n0.mean_util_pct, n0.min_util_pct) == (85.0, 70.0)
    assert (n0.memory_used_bytes, n0.memory_total_bytes) == (120 * GIB, 160 * GIB)
    assert summarise(rows, window_s=20)["n1"].mean_util_pct == 3.0  # every phase


def test_a_node_without_utilisation_readings_has_none_not_zero() -> None:
    summary = summarise([row("n0", 1, None, None)], window_s=60)["n0"]
    assert summary.mean_util_pct is None and summary.min_util_pct is None and summary.num_gpus == 2


@pytest.mark.parametrize(
    ("means", "threshold", "idle"),
    [
        ({"n0": 90.0, "n1": 2.0}, 10.0, {"n1"}),  # the brief's case
        ({"n0": 90.0, "n1": 85.0, "n2": 3.0, "n3": 88.0}, 10.0, {"n2"}),
        ({"n0": 2.0, "n1": 3.0}, 10.0, set()),  # everyone idle: the job's problem, no node's
        ({"n0": 90.0, "n1": 9.9}, 10.0, {"n1"}),
        ({"n0": 90.0, "n1": 10.0}, 10.0, set()),  # at the threshold is not below it
        ({"n0": 10.0, "n1": 2.0}, 10.0, {"n1"}),  # the others at the threshold count as busy
        ({"n0": 90.0, "n1": 2.0}, 0.0, set()),  # 0 turns the flag off
        ({"n0": 90.0}, 10.0, set()),  # one node: nobody to compare with
        ({"n0": 90.0, "n1": 1.0, "n2": 2.0}, 10.0, set()),  # median of the others: not busy
        ({"n0": 90.0, "n1": 80.0, "n2": 1.0, "n3": 2.0}, 10.0, {"n2", "n3"}),
    ],
)
def test_idle_judgement(means: dict[str, float], threshold: float, idle: set[str]) -> None:
    findings = judge_idle({n: usage(n, m) for n, m in means.items()}, threshold)
    assert {n for n, f in findings.items() if f.idle} == idle


def test_idle_judgement_needs_samples_and_readings() -> None:
    summaries = {
        "n0": usage("n0", 90.0),
        "n1": usage("n1", 1.0, num_samples=1),
        "n2": usage("n2", None),
    }
    assert judge_idle(summaries, 10.0) == {}  # n1 has one sample, n2 no reading: one judged node
    assert judge_idle(summaries, 10.0, min_samples=1)["n1"].idle


def test_idle_finding_says_why_with_its_numbers() -> None:
    finding = judge_idle({"n0": usage("n0", 91.0), "n1": usage("n1", 2.0, low=1.0)}, 10.0)["n1"]
    assert (finding.mean_util_pct, finding.min_util_pct, finding.others_util_pct) == (
        2.0,
        1.0,
        91.0,
    )
    assert finding.reason == (
        "n1: GPUs 2.0% busy (mean over 5 samples, lowest 1%) while the other nodes run at 91.0% "
        "(idle below 10%)"
    )


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (None, []),
        (0, []),
        (0x1, ["gpu_idle"]),
        (0x44, ["sw_power_cap", "hw_thermal_slowdown"]),
        (0x40 | 0x10000, ["hw_thermal_slowdown", "0x10000"]),
    ],
)
def test_clock_reasons_decode_to_names(mask: int | None, names: list[str]) -> None:
    assert clock_reason_names(mask) == names


def test_timeline_buckets_per_node_and_attempt() -> None:
    rows = [
        row("n0", 100, 90, 80),
        row("n0", 104, 100, 100),
        row("n0", 112, 60, 60, attempt=1),
        row("n1", 101, 2, 4),
        row("n1", 102, None, None),  # no reading: no bucket value from it
        row("n1", 99, 50, phase="preflight"),  # before the start: in no bucket, no attempt
    ]
    timeline = gpu_timeline(rows, start=100, end=115, bucket_s=5)
    assert timeline["bucket_s"] == 5 and timeline["start"] == 100
    assert timeline["nodes"] == {"n0": [92.5, None, 60.0, None], "n1": [3.0, None, None, None]}
    assert timeline["attempts"] == {
        "0": {
            "n0": {"mean_util_pct": 92.5, "min_util_pct": 80, "num_readings": 4},
            "n1": {"mean_util_pct": 3.0, "min_util_pct": 2, "num_readings": 2},
        },
        "1": {"n0": {"mean_util_pct": 60.0, "min_util_pct": 60, "num_readings": 2}},
    }


@pytest.mark.parametrize(("wall", "size"), [(10, 1), (30, 2), (100, 5), (3600, 300), (86400, 3600)])
def test_bucket_size_is_round(wall: float, size: float) -> None:
    assert bucket_size(wall) == size


# -- stored rows and the protocol -----------------------------------------------------------------


def test_stored_row_round_trips_and_drops_empty_fields() -> None:
    original = NodeSample(
        "node-0",
        3,
        "running",
        UtilisationSample(
            5.0,
            NvmlStatus.AVAILABLE,
            (
                GpuUtilisation(0, gpu_util_pct=7, power_w=650.5, not_supported=("sm_clock",)),
                GpuUtilisation(1, errors=(ProbeError("utilization", 15, "GPU is lost"),)),
            ),
        ),
    )
    data = original.to_json()
    assert data["gpus"][0] == {
        "index": 0,
        "gpu_util_pct": 7,
        "power_w": 650.5,
        "not_supported": ["sm_clock"],
    }
    assert "message" not in data
    assert NodeSample.from_json(json.loads(json.dumps(data))) == original


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "expected a JSON object"),
        ({"time": 1, "status": "available"}, "node: expected a node name"),
        ({"node": "n", "attempt": "1", "time": 1, "status": "available"}, "attempt: expected"),
        ({"node": "n", "time": 1, "status": "exploded"}, "status: Input should be"),
        (
            {"node": "n", "time": 1, "status": "available", "gpus": [{"gpu_util_pct": 5}]},
            "gpus.0.index",
        ),
    ],
)
def test_bad_stored_rows_say_which_field(data: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NodeSample.from_json(data)


def test_gpu_usage_message_round_trips_and_is_validated() -> None:
    message = GpuUsage("running", sample(1.5, 91, 3))
    line = encode_line(Envelope(message, "node-0", 2, 1.0), "token")
    envelope = decode_line(line, "token", AGENT_MESSAGES)
    assert envelope.message == message and envelope.attempt == 2
    bad = line.replace(b'"gpu_util_pct":91', b'"gpu_util_pct":"busy"')
    with pytest.raises(ProtocolError, match=r"gpu_usage: sample\.gpus\.0\.gpu_util_pct"):
        decode_line(bad, "token", AGENT_MESSAGES)


# -- the store and the recorder -------------------------------------------------------------------


@pytest.fixture
def journal(storage: Path) -> Journal:
    store = JobStore(str(storage))
    record = JobRecord(
        "gpu-1", "tiny", created_at=0.0, updated_at=0.0, nodes=[NodeRecord("n0"), NodeRecord("n1")]
    )
    store.create(record, "name: tiny\n")
    return Journal(store, record)


def chunks(storage: Path) -> list[Path]:
    return sorted((storage / "jobs" / "gpu-1" / "gpu").glob("*.jsonl.gz"))


def idle_events(journal: Journal) -> list[tuple[str, str | None, dict[str, Any]]]:
    log = journal.store.read_events("gpu-1")
    return [
        (e.kind, e.node, e.data.model_dump()) for e in log.events if e.kind.startswith("gpu_idle")
    ]


def test_recorder_batches_samples_into_few_objects(journal: Journal, storage: Path) -> None:
    recorder = GpuRecorder(journal, idle_util_pct=10, window_s=60, flush_s=10)
    for t in range(0, 25):  # two nodes, one sample a second each: 50 samples
        for node in ("n0", "n1"):
            recorder.add(node, 0, "running", sample(1000 + t, 50), now=1000 + t)
    assert len(chunks(storage)) == 2  # at 10 s and 20 s; the rest is buffered
    recorder.flush(now=1030)
    assert len(chunks(storage)) == 3
    assert all(path.stat().st_size < 2048 for path in chunks(storage))  # gzip'd: compact
    series = read_gpu_series(journal.store, "gpu-1")
    assert len(series.samples) == 50 and series.problems == []
    assert series.latest()["n1"].time == 1024
    assert not list((storage / "jobs" / "gpu-1" / "events").glob("*gpu*"))  # not events


def test_recorder_flags_an_idle_episode_once_and_its_end(journal: Journal) -> None:
    recorder = GpuRecorder(journal, idle_util_pct=10, window_s=5)
    for t in range(10):
        recorder.add("n0", 0, "running", sample(t, 90, 92), now=t)
        recorder.add("n1", 0, "running", sample(t, 2, 1), now=t + 0.5)
    assert [k for k, _, _ in idle_events(journal)] == ["gpu_idle"]  # once, not per sample
    _, node, data = idle_events(journal)[0]
    assert node == "n1"
    assert data == {
        "mean_util_pct": 1.5,
        "min_util_pct": 1.0,
        "others_util_pct": 91.0,
        "threshold_pct": 10.0,
        "window_s": 5.0,
        "num_samples": 2,
    }
    assert set(recorder.idle) == {"n1"}
    for t in range(10, 20):  # n1 gets to work
        recorder.add("n0", 0, "running", sample(t, 90), now=t)
        recorder.add("n1", 0, "running", sample(t, 88), now=t + 0.5)
    assert [k for k, _, _ in idle_events(journal)] == ["gpu_idle", "gpu_idle_cleared"]
    assert recorder.idle == {}


def test_preflight_samples_never_flag_idle(journal: Journal) -> None:
    recorder = GpuRecorder(journal, idle_util_pct=10, window_s=60)
    for t in range(5):
        recorder.add("n0", 0, "running", sample(t, 90), now=t)
        recorder.add("n1", 0, "preflight", sample(t, 0), now=t + 0.5)
    assert idle_events(journal) == []


def test_a_failing_store_keeps_samples_for_the_next_flush(journal: Journal, storage: Path) -> None:
    recorder = GpuRecorder(journal, idle_util_pct=10, window_s=60, flush_s=1000)
    recorder.add("n0", 0, "running", sample(1, 50), now=1)
    gpu_dir = storage / "jobs" / "gpu-1" / "gpu"
    gpu_dir.parent.mkdir(parents=True, exist_ok=True)
    gpu_dir.write_text("a file where the directory should be")
    recorder.flush(now=2)
    assert recorder.write_errors == 1 and "File exists" in (recorder.last_error or "")
    gpu_dir.unlink()
    recorder.flush(now=3)
    assert len(read_gpu_series(journal.store, "gpu-1").samples) == 1


def test_damaged_chunks_are_problems_not_crashes(journal: Journal, storage: Path) -> None:
    journal.write_gpu_chunk([row("n0", 1, 50).to_json(), {"node": "n1"}], now=1)
    directory = storage / "jobs" / "gpu-1" / "gpu"
    (directory / "00000000002000000-1-000001.jsonl.gz").write_bytes(b"not gzip")
    (directory / "00000000003000000-1-000002.jsonl.gz").write_bytes(
        gzip.compress(b'[1]\n{"node": 5}\n')
    )
    series = read_gpu_series(journal.store, "gpu-1")
    assert [s.node for s in series.samples] == ["n0"]
    reasons = sorted(p.reason for p in series.problems)
    assert len(reasons) == 4 and any("not gzip" in r for r in reasons)
    assert any("line 1 is not a JSON object" in r for r in reasons)


def test_a_recent_read_skips_old_chunks(journal: Journal) -> None:
    journal.write_gpu_chunk([row("n0", 100, 1).to_json()], now=100)
    journal.write_gpu_chunk([row("n0", 1000, 2).to_json()], now=1000)
    journal.write_gpu_chunk([row("n0", 1290, 3).to_json()], now=1300)
    recent = read_gpu_series(journal.store, "gpu-1", last_s=300)
    assert [s.time for s in recent.samples] == [1000, 1290]


# -- the commands, on a synthetic store -----------------------------------------------------------


def trainctl(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "-s", "KILL", "60", sys.executable, "-m", "trainctl.cli.main", *args],
        cwd=REPO,
        env=sealed_env(storage),
        capture_output=True,
        text=True,
    )


@pytest.fixture
def busy_and_idle(journal: Journal, storage: Path) -> Path:
    journal.record.state = JobState.RUNNING
    journal.save_state()
    rows = []
    for t in range(0, 20, 2):
        rows.append(row("n0", 1000 + t, 90, 92).to_json())
        rows.append(row("n1", 1000 + t, 2, 1).to_json())
    latest = UtilisationSample(
        1021,
        NvmlStatus.AVAILABLE,
        (
            GpuUtilisation(
                0,
                gpu_util_pct=3,
                memory_used_bytes=2 * GIB,
                memory_total_bytes=80 * GIB,
                power_w=95.0,
                power_limit_w=700.0,
                temperature_c=33,
                sm_clock_mhz=345,
                sm_clock_max_mhz=1980,
                clock_event_reasons=0x1,
                ecc_corrected_volatile=0,
                ecc_uncorrected_volatile=0,
            ),
        ),
    )
    rows.append(NodeSample("n1", 0, "running", latest).to_json())
    journal.write_gpu_chunk(rows, now=1022)
    return storage


def test_status_shows_gpu_use_and_the_idle_node(busy_and_idle: Path) -> None:
    done = trainctl(busy_and_idle, "status", "gpu-1", "--json")
    assert done.returncode == 0, done.stderr
    nodes = {n["name"]: n for n in json.loads(done.stdout)["nodes"]}
    n0, n1 = nodes["n0"]["gpu"], nodes["n1"]["gpu"]
    assert (n0["mean_util_pct"], n0["min_util_pct"], n0["idle"]) == (91.0, 90.0, None)
    assert n0["memory_used_bytes"] == 120 * GIB and n0["memory_total_bytes"] == 160 * GIB
    assert n1["idle"]["idle"] is True and n1["idle"]["others_util_pct"] == 91.0
    text = trainctl(busy_and_idle, "status", "gpu-1")
    assert text.returncode == 0, text.stderr
    assert "91% (min 90%), 120.0/160.0 GiB" in text.stdout
    assert "GPUs idle: n1: GPUs 1.6% busy" in text.stdout


def test_health_job_shows_each_gpus_latest_readings(busy_and_idle: Path) -> None:
    done = trainctl(busy_and_idle, "health", "gpu-1", "--json")
    assert done.returncode == 0, done.stderr
    gpus = json.loads(done.stdout)["gpus"]
    assert gpus["n1"]["time"] == "1970-01-01T00:17:01+00:00"  # ISO 8601, like every JSON time
    assert gpus["n1"]["gpus"][0]["clock_event_reason_names"] == ["gpu_idle"]
    assert gpus["n0"]["gpus"][1]["gpu_util_pct"] == 92
    text = trainctl(busy_and_idle, "health", "gpu-1")
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("n1"))
    assert line.split() == [
        "n1",
        "0",
        "3%",
        "2.0/80.0G",
        "95W/700W",
        "33C",
        "345/1980",
        "0/0",
        "gpu_idle",
    ]


def test_report_shows_gpu_use_over_time(busy_and_idle: Path, storage: Path) -> None:
    store = JobStore(str(storage))
    from trainctl.events import AttemptStarted, Event

    store.append_event(
        "gpu-1", Event(1000.0, "attempt 0", AttemptStarted(nodes=["n0", "n1"]), None, 0)
    )
    done = trainctl(busy_and_idle, "report", "gpu-1", "--json", "--out", str(storage / "r.html"))
    assert done.returncode == 0, done.stderr
    gpu = json.loads(done.stdout)["gpu"]
    assert gpu["attempts"]["0"]["n0"]["mean_util_pct"] == 91.0
    assert gpu["nodes"]["n1"][0] < 5 and gpu["nodes"]["n0"][0] > 85
    text = trainctl(busy_and_idle, "report", "gpu-1", "--out", str(storage / "r.html"))
    assert text.returncode == 0, text.stderr
    assert "GPU utilisation per node" in text.stdout and "  n0: 91" in text.stdout
    page = (storage / "r.html").read_text()
    assert "<h2>GPU utilisation</h2>" in page and "<td>n1</td>" in page


def test_gpu_chunks_on_s3_are_written_once_and_read_back(s3: S3Endpoint) -> None:
    store = JobStore(s3.root("store"), s3.storage_options)
    record = JobRecord("gpu-s3", "tiny", created_at=0.0, updated_at=0.0)
    store.create(record, "name: tiny\n")
    recorder = GpuRecorder(Journal(store, record), idle_util_pct=10, window_s=60, flush_s=5)
    for t in range(12):
        recorder.add("n0", 0, "running", sample(100 + t, 80), now=100 + t)
    recorder.flush(now=120)  # nothing left: flushed at 105 (100-105) and 111 (106-111)
    names = store.files.list(f"{store.job_url('gpu-s3')}/gpu")
    assert len(names) == 2 and all(name.endswith(".jsonl.gz") for name in names)
    series = read_gpu_series(store, "gpu-s3")
    assert [s.time for s in series.samples] == [100 + t for t in range(12)]
    rows, problems = store.read_gpu_rows("gpu-s3", last_s=1)  # the newest chunk only
    assert [row["time"] for row in rows] == [106 + t for t in range(6)] and problems == []
