"""`trainctl health [JOB]` end to end: the real CLI in a sealed environment (NO_COLOR=1,
COLUMNS=80, temp HOME and storage root), with and without the fake NVML."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict
from trainctl.state import JobRecord, NodeRecord, NodeState
from trainctl.store import JobStore

EnvFactory = Callable[[Path | None, Path | None], dict[str, str]]


def trainctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainctl.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


STATUSES = {"OK", "DEGRADED", "UNHEALTHY"}


def table_rows(stderr: str) -> dict[str, str]:
    """First cell → status of each table row (wrapped continuation lines carry no status)."""
    cells = [line.split() for line in stderr.splitlines()]
    return {row[0]: row[1] for row in cells if len(row) >= 2 and row[1] in STATUSES}


def test_health_json_without_nvml_fails_open(sealed_env: EnvFactory, no_real_nvml: None) -> None:
    env = sealed_env(None, None)
    done = trainctl(env, "health", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "OK"
    assert result["evidence"]["gpus"]["reason"] == "NVML unavailable: no GPU probes"
    assert result["readings"]["nvml"]["status"] == "library_missing"
    disks = result["readings"]["host"]["disks"]
    assert [disk["path"] for disk in disks] == [env["TRAINCTL_STORAGE"]]
    assert result["readings"]["host"]["memory"]["available_bytes"] > 0


def test_health_table_without_nvml(sealed_env: EnvFactory, no_real_nvml: None) -> None:
    env = sealed_env(None, None)
    done = trainctl(env, "health")
    assert done.returncode == 0, done.stderr
    # the checks and the verdict are the answer (stdout); the NVML note is chatter (stderr)
    assert done.stderr == "NVML unavailable: no GPU probes\n"
    lines = done.stdout.splitlines()
    assert lines[0].strip().startswith("health of ")  # rich centres the title
    assert lines[1].split() == ["CHECK", "STATUS", "DETAIL"]
    assert lines[2].split() == ["gpus", "OK", "NVML", "unavailable:", "no", "GPU", "probes"]
    assert table_rows(done.stdout) == {"gpus": "OK", "disk": "OK", "memory": "OK"}
    assert "GiB free" in done.stdout and "GiB available" in done.stdout
    assert lines[-1].startswith("verdict: OK: gpus: NVML unavailable: no GPU probes")
    assert all(len(line) <= 80 for line in lines[:-1])


def test_health_with_a_broken_gpu_exits_1(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    faults = tmp_path / "node.nvml"
    faults.write_text("device_count=2\ngpu.1.xid=79\n")
    env = sealed_env(fake_nvml_lib, faults)
    done = trainctl(env, "health", "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "UNHEALTHY"
    assert result["reason"] == "gpus: gpu1: XID 79 (GPU has fallen off the bus)"

    table = trainctl(env, "health")
    assert table.returncode == 1
    assert table_rows(table.stdout) == {
        "gpu0": "OK",
        "gpu1": "UNHEALTHY",
        "disk": "OK",
        "memory": "OK",
    }


def test_health_with_healthy_fake_gpus_passes(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    faults = tmp_path / "node.nvml"
    faults.write_text("device_count=2\n")
    done = trainctl(sealed_env(fake_nvml_lib, faults), "health", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["evidence"]["gpus"]["reason"] == "2 GPUs OK (driver 550.54.15)"


def write_verdicts(storage: str) -> None:
    store = JobStore(storage)
    good = HealthVerdict(Verdict.OK, "gpus: 8 GPUs OK (driver 550)", {"gpus": {}})
    bad = HealthVerdict(
        Verdict.UNHEALTHY,
        "gpus: gpu3: XID 79 (GPU has fallen off the bus)",
        {"gpus": {"evidence": {"gpu3": {"evidence": {"xids": {"79": "fallen off the bus"}}}}}},
    )
    store.write_node("job-1", "node0", NodeVerdictRecord("node0", "preflight", 1.0, good).to_dict())
    store.write_node("job-1", "node1", NodeVerdictRecord("node1", "preflight", 2.0, bad).to_dict())


def test_health_job_json_shows_every_node_with_evidence(sealed_env: EnvFactory) -> None:
    env = sealed_env(None, None)
    write_verdicts(env["TRAINCTL_STORAGE"])
    done = trainctl(env, "health", "job-1", "--json")
    assert done.returncode == 1, done.stderr  # a node is UNHEALTHY
    result = json.loads(done.stdout)
    assert result["job_id"] == "job-1" and result["status"] == "UNHEALTHY"
    assert sorted(result["nodes"]) == ["node0", "node1"]
    node1 = result["nodes"]["node1"]
    assert (node1["status"], node1["phase"]) == ("UNHEALTHY", "preflight")
    assert node1["checked_at"] == "1970-01-01T00:00:02+00:00" and node1["state"] is None
    assert node1["evidence"]["gpus"]["evidence"]["gpu3"]["evidence"]["xids"] == {
        "79": "fallen off the bus"
    }


def test_health_job_table(sealed_env: EnvFactory) -> None:
    env = sealed_env(None, None)
    write_verdicts(env["TRAINCTL_STORAGE"])
    done = trainctl(env, "health", "job-1")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].strip() == "node health of job-1"
    assert lines[1].split() == ["NODE", "STATE", "LAST", "VERDICT", "CHECKED", "REASON"]
    # no state.json: the nodes' standing is unknown; the check's time, wall clock and age
    rows = [line for line in lines[2:] if line.startswith("node")]  # REASON may wrap
    assert rows[0].split()[:6] == ["node0", "?", "OK", "1970-01-01", "00:00:01", "UTC"]
    assert rows[1].split()[:3] == ["node1", "?", "UNHEALTHY"]
    assert "preflight:" in rows[0] and "ago)" in rows[0]
    assert "XID 79" in done.stdout


def test_health_job_shows_an_excluded_node_as_excluded_not_running(
    sealed_env: EnvFactory,
) -> None:
    """A node that was healthy when last checked, then killed and excluded: its last verdict
    is OK (while running), and the table says it is out of the job, not `OK running`."""
    env = sealed_env(None, None)
    store = JobStore(env["TRAINCTL_STORAGE"])
    record = JobRecord(job_id="job-2", name="n", created_at=1.0, updated_at=1.0)
    record.nodes = [NodeRecord(name="node-0"), NodeRecord(name="node-1")]
    record.nodes[0].state = NodeState.RUNNING
    record.nodes[1].state = NodeState.FAILED
    store.create(record, "name: n\nscript: x.py\n")
    ok = HealthVerdict(Verdict.OK, "gpus: 8 GPUs OK", {})
    for node in ("node-0", "node-1"):
        store.write_node("job-2", node, NodeVerdictRecord(node, "running", 5.0, ok).to_dict())
    blocked = {"reason": "node agent lost", "since": 6.0, "expires_at": time.time() + 3600}
    store.write_blocklist("job-2", {"node-1": blocked})
    done = trainctl(env, "health", "job-2", "-q")
    assert done.returncode == 0, done.stderr
    cells = [line.split() for line in done.stdout.splitlines()[2:]]
    rows = {row[0]: row[1:3] for row in cells if row[0].startswith("node-")}
    assert rows == {"node-0": ["running", "OK"], "node-1": ["excluded", "OK"]}
    shown = json.loads(trainctl(env, "health", "job-2", "--json").stdout)["nodes"]
    assert (shown["node-0"]["state"], shown["node-1"]["state"]) == ("running", "excluded")


def test_health_of_an_unknown_job_is_a_user_error(sealed_env: EnvFactory, tmp_path: Path) -> None:
    env = sealed_env(None, None)
    missing = trainctl(env, "health", "no-such-job")  # no storage root yet: that is said first
    assert missing.returncode == 2 and "the storage root does not exist" in missing.stderr
    Path(env["TRAINCTL_STORAGE"]).mkdir()
    done = trainctl(env, "health", "no-such-job")
    assert done.returncode == 2
    assert "no such job (got 'no-such-job')" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_endpoint_is_a_user_error(sealed_env: EnvFactory) -> None:
    done = trainctl(sealed_env(None, None), "health", "--endpoint", "nohost")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --endpoint: expected HOST:PORT (got 'nohost')")
    assert "fix: e.g. --endpoint head:29400" in done.stderr
