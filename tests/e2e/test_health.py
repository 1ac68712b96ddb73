"""End-to-end health: the pre-rendezvous gate, hang detection with stack dumps, stragglers.

Real 2-node jobs on the local scheduler (real torchrun, gloo), real pynvml through the fake
libnvidia-ml.so.1 (one fault file per node through the recipe's `node_env`), a real SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.harness import (
    assert_no_leftovers,
    job_processes,
    launch,
    read_state,
    start_launch,
    trainctl,
    wait_for_event,
    wait_for_step,
)
from tests.fakenvml.build import build_or_skip
from trainctl.launch.stacks import dump_with_faulthandler
from trainctl.launch.zygote import worker_identity
from trainctl.protocol import Env

pytestmark = pytest.mark.e2e

PACED = str(REPO / "tests" / "e2e" / "scripts" / "paced.py")


@pytest.fixture(scope="module")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_or_skip(tmp_path_factory.mktemp("fakenvml"))


def write_recipe(directory: Path, name: str, **fields: Any) -> str:
    recipe = {"name": name, "script": PACED, "nodes": 2, "nproc_per_node": 1, **fields}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def events(storage: Path, job_id: str) -> list[dict[str, Any]]:
    result = trainctl("events", job_id, "--json", storage=storage)
    assert result.returncode == 0, result.stderr
    items: list[dict[str, Any]] = result.json()
    for item in items:  # --json times are ISO 8601 with a zone; compare as Unix times here
        item["time"] = datetime.fromisoformat(item["time"]).timestamp()
    return items


def node_record(storage: Path, job_id: str, node: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (storage / "jobs" / job_id / "nodes" / f"{node}.json").read_text()
    )
    return data


def nvml_env(lib_dir: Path, fault_file: Path) -> dict[str, str]:
    previous = os.environ.get("LD_LIBRARY_PATH")
    path = str(lib_dir) + (os.pathsep + previous if previous else "")
    return {"LD_LIBRARY_PATH": path, "FAKE_NVML_FILE": str(fault_file)}


def test_xid_79_before_start_keeps_the_node_out(
    storage: Path, tmp_path: Path, fake_nvml_dir: Path
) -> None:
    healthy, broken = tmp_path / "node-0.nvml", tmp_path / "node-1.nvml"
    healthy.write_text("device_count=2\n")
    broken.write_text("device_count=2\ngpu.1.xid=79\n")
    recipe = write_recipe(
        tmp_path,
        "xid",
        max_steps=5,
        node_env={
            "node-0": nvml_env(fake_nvml_dir, healthy),
            "node-1": nvml_env(fake_nvml_dir, broken),
        },
        launch={"stop_grace_s": 1},
    )
    dry = trainctl("launch", recipe, "--dry-run", "--job-id", "x", storage=storage)
    assert f"FAKE_NVML_FILE={broken}" in dry.stdout and "health gate:" in dry.stdout

    result = launch(recipe, job_id="xid", storage=storage)

    assert result.returncode == 1, result.stderr
    state = read_state(storage, "xid")
    assert state["state"] == "failed"
    assert "node-1" in state["reason"] and "UNHEALTHY before joining" in state["reason"]
    assert "XID 79" in state["reason"]
    nodes = {n["name"]: n for n in state["nodes"]}
    assert nodes["node-1"]["state"] == "excluded"  # on the blocklist, with the verdict
    assert nodes["node-0"]["state"] == "stopped"
    record = node_record(storage, "xid", "node-1")
    assert record["status"] == "UNHEALTHY" and record["phase"] == "preflight"
    gpu1 = record["evidence"]["gpus"]["evidence"]["gpu1"]
    assert gpu1["status"] == "UNHEALTHY" and gpu1["evidence"]["reading"]["xid_events"] == [79]
    assert node_record(storage, "xid", "node-0")["status"] == "OK"
    items = events(storage, "xid")
    started = {e["node"] for e in items if e["kind"] == "node_started"}
    assert "node-1" not in started, "an UNHEALTHY node must not start torchrun"
    log = (storage / "jobs" / "xid" / "logs" / "node-1.log").read_text()
    assert "--- attempt" not in log
    verdicts = [e for e in items if e["kind"] == "node_verdict" and e["node"] == "node-1"]
    assert verdicts and "XID 79" in verdicts[0]["message"]
    final = items[-1]
    assert final["kind"] == "job_failed" and final["data"]["blamed"] == "node-1"

    health = trainctl("health", "xid", "--json", storage=storage)
    assert health.returncode == 1
    shown = health.json()
    assert shown["status"] == "UNHEALTHY"
    assert shown["nodes"]["node-1"]["status"] == "UNHEALTHY"
    assert shown["nodes"]["node-1"]["evidence"]["gpus"]["status"] == "UNHEALTHY"
    assert shown["nodes"]["node-0"]["status"] == "OK"
    status = trainctl("status", "xid", "--json", storage=storage).json()
    assert {n["name"]: n["health"]["status"] for n in status["nodes"]} == {
        "node-0": "OK",
        "node-1": "UNHEALTHY",
    }


def node_worker(job_id: str, node: str) -> tuple[int, int]:
    """(pid, rank) of the worker on `node` (its node tag in /proc environ, its rank from
    `worker_identity`: a warm worker carries it in its name).

    torchrun assigns ranks to nodes in join order, so node-1 may hold rank 0.
    """
    for pid in job_processes(job_id):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        identity = worker_identity(pid)
        if identity is not None and f"TRAINCTL_NODE={node}".encode() in raw:
            return pid, identity[0]
    raise AssertionError(f"no worker on {node}")


def stop_launch(proc: subprocess.Popen[str]) -> None:
    """End a background launch after a failed assertion: SIGTERM reaches trainctl."""
    if proc.poll() is None:
        proc.terminate()  # `timeout` forwards it to trainctl, which stops the job
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HANG_TIMEOUT_S = 5.0
"""Pinned: small enough for a short test, large enough that a step starved by a loaded
machine is not a false hang before the SIGSTOP."""


def test_sigstopped_worker_is_a_hang_with_stacks_of_every_rank(
    storage: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path,
        "hang",
        max_steps=100000,
        config={"step_sleep_s": 0.05},
        health={"hang_timeout_s": HANG_TIMEOUT_S, "probe_interval_s": 1},
        launch={"stop_grace_s": 1},
    )
    job = "hang"
    proc = start_launch(recipe, job_id=job, storage=storage)
    stopped_pid = None
    try:
        wait_for_step(storage, job, 5)
        stopped_pid, stopped_rank = node_worker(job, "node-1")
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped_at = time.time()
        proc.wait(timeout=120)
    finally:
        if stopped_pid is not None:
            try:
                os.kill(stopped_pid, signal.SIGCONT)
                os.kill(stopped_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_launch(proc)
        assert_no_leftovers(job)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1, stderr

    items = events(storage, job)
    detected = next(e for e in items if e["kind"] == "hang_detected")
    latency = detected["time"] - stopped_at
    print(f"hang-detection latency (SIGSTOP -> hang_detected): {latency:.2f} s")
    assert latency <= HANG_TIMEOUT_S + 1.0, latency
    assert "pinned by the recipe" in detected["message"]
    assert detected["data"]["timeout_s"] == HANG_TIMEOUT_S

    stacks = storage / "jobs" / job / "stacks" / "attempt-0"
    live_rank = 1 - stopped_rank
    node0 = stacks / f"node-0-rank-{live_rank}.txt"
    node1 = stacks / f"node-1-rank-{stopped_rank}.txt"
    assert node0.is_file() and node1.is_file(), sorted(p.name for p in stacks.glob("*"))
    stopped_dump = node1.read_text()
    assert "process state T" in stopped_dump and "# method: py-spy" in stopped_dump
    assert "paced.py" in stopped_dump
    assert "paced.py" in node0.read_text()  # the live rank waits in its all-reduce
    saved = [e for e in items if e["kind"] == "stacks_saved"]
    assert {e["node"] for e in saved} == {"node-0", "node-1"}

    state = read_state(storage, job)
    assert state["state"] == "failed"
    assert state["reason"].startswith("hang: no progress")
    assert f"rank {stopped_rank} on node-1 is stopped (state T)" in state["reason"]
    assert f"hang timeout {HANG_TIMEOUT_S:g} s" in state["reason"]
    assert items[-1]["kind"] == "job_failed" and items[-1]["data"]["blamed"] == "node-1"
    nodes = {n["name"]: n["state"] for n in state["nodes"]}
    assert nodes == {"node-0": "stopped", "node-1": "excluded"}


def test_slow_node_is_flagged_degraded_and_the_job_succeeds(storage: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "slow",
        max_steps=30,
        config={"step_sleep_s": 0.02, "slow_nodes": ["node-1"], "slow_extra_s": 0.1},
        health={"straggler_factor": 1.5, "straggler_window": 10},
    )

    result = launch(recipe, job_id="slow", storage=storage)

    assert result.returncode == 0, result.stderr
    assert read_state(storage, "slow")["state"] == "succeeded"
    record = node_record(storage, "slow", "node-1")
    assert record["status"] == "DEGRADED" and record["phase"] == "running"
    assert "straggler" in record["reason"]
    numbers = record["evidence"]["progress"]["evidence"]
    assert numbers["measure"] == "busy"
    assert numbers["ratio"] > 1.5 and numbers["median_step_s"] >= 0.1
    assert node_record(storage, "slow", "node-0")["status"] == "OK"
    flagged = [e for e in events(storage, "slow") if e["kind"] == "straggler"]
    assert [e["node"] for e in flagged] == ["node-1"]
    assert "median step" in flagged[0]["message"] and "×" in flagged[0]["message"]
    health = trainctl("health", "slow", "--json", storage=storage)
    assert health.returncode == 0
    assert health.json()["nodes"]["node-1"]["status"] == "DEGRADED"


def test_xid_while_running_fails_the_attempt_with_the_node_blamed(
    storage: Path, tmp_path: Path, fake_nvml_dir: Path
) -> None:
    faults = {node: tmp_path / f"{node}.nvml" for node in ("node-0", "node-1")}
    for fault_file in faults.values():
        fault_file.write_text("device_count=1\n")
    recipe = write_recipe(
        tmp_path,
        "xidrun",
        max_steps=100000,
        config={"step_sleep_s": 0.05},
        node_env={node: nvml_env(fake_nvml_dir, path) for node, path in faults.items()},
        health={"probe_interval_s": 0.5},
        launch={"stop_grace_s": 1},
    )
    proc = start_launch(recipe, job_id="xidrun", storage=storage)
    try:
        wait_for_step(storage, "xidrun", 3)
        # The fake library re-reads its file on every call. A hot GPU is DEGRADED: recorded,
        # and the job keeps running.
        faults["node-1"].write_text("device_count=1\ngpu.0.temperature=95\n")
        degraded = wait_for_event(storage, "xidrun", "node_verdict", status="DEGRADED")
        assert degraded["node"] == "node-1" and "thermal slowdown" in degraded["message"]
        assert node_record(storage, "xidrun", "node-1")["status"] == "DEGRADED"
        wait_for_step(storage, "xidrun", read_state(storage, "xidrun")["step"] + 3)
        # A fatal XID makes node-0 UNHEALTHY: a node fault.
        faults["node-0"].write_text("device_count=1\ngpu.0.xid=48\n")
        proc.wait(timeout=120)
    finally:
        stop_launch(proc)
        assert_no_leftovers("xidrun")
    assert proc.returncode == 1
    state = read_state(storage, "xidrun")
    assert state["reason"].startswith("node-0: UNHEALTHY while running: gpus: gpu0: XID 48")
    record = node_record(storage, "xidrun", "node-0")
    assert record["status"] == "UNHEALTHY" and record["phase"] == "running"
    items = events(storage, "xidrun")
    assert items[-1]["kind"] == "job_failed" and items[-1]["data"]["blamed"] == "node-0"


def test_faulthandler_fallback_dumps_a_running_worker(tmp_path: Path) -> None:
    """Where py-spy cannot read a process, SIGUSR2 makes the runtime write its stacks."""
    code = (
        "import time\n"
        "from trainctl.runtime.reporter import Reporter\n"
        "reporter = Reporter.from_env(3)\n"
        "def waiting_for_peers():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "waiting_for_peers()\n"
    )
    env = {**os.environ, Env.STACKS_DIR: str(tmp_path), "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        text, error = dump_with_faulthandler(worker.pid, tmp_path / "rank-3.txt")
        assert error is None and text is not None
        assert "waiting_for_peers" in text
    finally:
        worker.kill()
        worker.wait()
