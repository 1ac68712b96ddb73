"""trainctl jobs on a real Slurm cluster (localhost: munged, slurmctld, slurmd n1..n4).

`trainctl launch --scheduler slurm` submits the batch script; Slurm runs `trainctl resume` on
the allocation's first node, which starts one node agent per node with srun. Each job ends
with the fingerprint of an uninterrupted local run of the same recipe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import events, launch, read_state, trainctl, wait_for_step, write_recipe
from tests.slurm.cluster import LocalSlurmCluster
from trainctl.launch.slurm import SlurmClient

pytestmark = pytest.mark.e2e

CONFIG = {"step_sleep_s": 0.1}
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("slurm-baseline")
    storage = directory / "store"
    storage.mkdir()
    recipe = write_recipe(directory, "sgpt", config=CONFIG)
    result = launch(str(recipe), "--json", job_id="slurm-baseline", storage=storage)
    assert result.returncode == 0, result.stderr
    return str(result.json()["fingerprint"])


def submit(cluster: LocalSlurmCluster, storage: Path, recipe: Path, job: str) -> str:
    result = trainctl(
        "launch",
        str(recipe),
        "--scheduler",
        "slurm",
        "--job-id",
        job,
        "--json",
        storage=storage,
        SLURM_CONF=str(cluster.conf),
    )
    assert result.returncode == 0, result.stderr
    out = result.json()
    assert out["job_id"] == job and out["slurm_job_id"].isdigit()
    return str(out["slurm_job_id"])


def status(cluster: LocalSlurmCluster, storage: Path, job: str) -> dict[str, Any]:
    result = trainctl("status", job, "--json", storage=storage, SLURM_CONF=str(cluster.conf))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = result.json()
    return data


def wait_until_done(
    cluster: LocalSlurmCluster, storage: Path, job: str, timeout_s: float = JOB_TIMEOUT_S
) -> tuple[dict[str, Any], set[str]]:
    """Poll `trainctl status` until the job succeeded; returns its state and Slurm's states."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = status(cluster, storage, job)
        slurm_state = (data.get("slurm") or {}).get("state")
        if slurm_state:
            seen.add(str(slurm_state))
        if data["state"] == "succeeded":
            return data, seen
        time.sleep(0.5)
    log = (storage / "jobs" / job / "slurm.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"job {job} did not finish in {timeout_s}s; Slurm saw {seen}\n{log}")


@pytest.mark.timeout(300)
def test_two_node_job_runs_under_slurm(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    baseline: str,
) -> None:
    recipe = write_recipe(tmp_path, "sgpt", config=CONFIG)
    dry = trainctl(
        "launch", str(recipe), "--scheduler", "slurm", "--dry-run", "--job-id", "x", storage=storage
    )
    assert dry.returncode == 0 and "#SBATCH --requeue" in dry.stdout
    assert not (storage / "jobs" / "x").exists()  # a dry run writes nothing
    sid = submit(slurm_cluster, storage, recipe, "s-run")
    data, seen = wait_until_done(slurm_cluster, storage, "s-run")
    assert data["fingerprint"] == baseline
    assert "RUNNING" in seen, seen
    assert data["scheduler_job_id"] == sid
    (attempt,) = data["attempts"]
    assert set(attempt["nodes"]) <= set(slurm_cluster.nodes) and len(attempt["nodes"]) == 2
    assert attempt["scheduler_restart_count"] is None  # the first run


@pytest.mark.timeout(300)
def test_usr1_checkpoints_requeues_and_resumes(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    baseline: str,
) -> None:
    recipe = write_recipe(tmp_path, "sgpt", config=CONFIG)
    sid = submit(slurm_cluster, storage, recipe, "s-usr1")
    wait_for_step(storage, "s-usr1", 12, timeout_s=120)
    slurm_cluster.run("scancel", "--signal=USR1", "--full", sid)
    data, _ = wait_until_done(slurm_cluster, storage, "s-usr1")
    assert data["fingerprint"] == baseline
    first, last = data["attempts"][0], data["attempts"][-1]
    assert first["state"] == "stopped" and first["exit_code"] == 4
    assert last["scheduler_restart_count"] == 1
    assert last["restored_step"] is not None and last["restored_step"] >= 12
    kinds = [e["kind"] for e in events(storage, "s-usr1")]
    assert "requeue" in kinds and "job_resumed" in kinds


@pytest.mark.timeout(360)
def test_crashed_node_is_excluded_on_requeue_and_drained(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    baseline: str,
) -> None:
    recipe = write_recipe(tmp_path, "sgpt", config=CONFIG, slurm={"drain_blamed_nodes": True})
    submit(slurm_cluster, storage, recipe, "s-crash")
    wait_for_step(storage, "s-crash", 12, timeout_s=120)
    nodes = read_state(storage, "s-crash")["attempts"][-1]["nodes"]
    victim = nodes[-1]  # not the batch host: it runs the controller
    try:
        slurm_cluster.crash_node(victim)
        data, _ = wait_until_done(slurm_cluster, storage, "s-crash", timeout_s=300)
    finally:
        slurm_cluster.restart_node(victim)
    assert data["fingerprint"] == baseline
    assert data["attempts"][0]["blamed"] == victim
    assert victim not in data["attempts"][-1]["nodes"]
    blocked = json.loads((storage / "jobs" / "s-crash" / "blocklist.json").read_text())["nodes"]
    assert victim in blocked
    requeued = [e for e in events(storage, "s-crash") if e["kind"] == "requeue"]
    assert requeued and requeued[0]["data"]["excluded"] == [victim]
    # slurm.drain_blamed_nodes: the blamed node is drained for every job, with trainctl's why.
    assert "DRAIN" in slurm.node_state(victim)
    shown = slurm_cluster.run("scontrol", "--oneliner", "show", "node", victim).stdout
    assert "Reason=trainctl job s-crash:" in shown, shown


@pytest.mark.timeout(300)
def test_drained_node_is_never_used(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    baseline: str,
) -> None:
    slurm.drain("n1", "trainctl test: drained")
    recipe = write_recipe(tmp_path, "sgpt", config=CONFIG)
    submit(slurm_cluster, storage, recipe, "s-drain")
    data, _ = wait_until_done(slurm_cluster, storage, "s-drain")
    assert data["fingerprint"] == baseline
    assert all("n1" not in a["nodes"] for a in data["attempts"])
