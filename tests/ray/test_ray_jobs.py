"""`trainctl launch --scheduler ray` on a real multi-node Ray cluster (tests/ray/conftest.py).

Real raylets, a real placement group (STRICT_SPREAD), real node agents in actors pinned to its
bundles, real torchrun and gloo. The tests share one cluster and run in file order: one takes
a Ray node away and the next gives one back. Each job must end with the fingerprint of the
same recipe run on the local scheduler, and leave no process of the job behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    JOB_TIMEOUT_S,
    SLOW,
    assert_no_leftovers,
    blocklist,
    events,
    launch,
    read_state,
    start_launch,
    trainctl,
    wait_for_step,
    write_recipe,
)
from tests.ray.conftest import RayTestCluster

pytestmark = pytest.mark.e2e


def ray_launch(recipe: Path, job_id: str, storage: Path, address: str, *args: str) -> Any:
    return launch(
        str(recipe),
        "--scheduler",
        "ray",
        "--address",
        address,
        "--json",
        *args,
        job_id=job_id,
        storage=storage,
    )


def start_ray_launch(recipe: Path, job_id: str, storage: Path, address: str) -> Any:
    return start_launch(
        str(recipe),
        "--scheduler",
        "ray",
        "--address",
        address,
        "--json",
        job_id=job_id,
        storage=storage,
    )


def run_losing_a_node(
    recipe: Path,
    job_id: str,
    storage: Path,
    cluster: RayTestCluster,
    tmp_path: Path,
    *,
    replace: bool = True,
) -> tuple[int, str, str, str]:
    """Launch `recipe`, remove the Ray node of the first attempt's second node once step 8 is
    reached, wait for the launch to end (no process of the job left behind), and add a worker
    back (`replace`) for the next test; returns (exit code, stdout, stderr, removed node)."""
    proc = start_ray_launch(recipe, job_id, storage, cluster.address)
    try:
        wait_for_step(storage, job_id, 8)
        victim = read_state(storage, job_id)["attempts"][0]["nodes"][1]
        cluster.remove_worker(victim)
        out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers(job_id)
        if replace:
            cluster.add_worker(tmp_path)
    return proc.returncode, out, err, victim


@pytest.fixture(scope="module")
def local_fingerprint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same recipe, uninterrupted, on the local scheduler."""
    directory = tmp_path_factory.mktemp("local")
    storage = directory / "store"
    storage.mkdir()
    recipe = write_recipe(directory, "gpt", config={**SLOW})
    result = launch(str(recipe), "--json", job_id="local", storage=storage)
    assert result.returncode == 0, result.stderr
    fingerprint: str = result.json()["fingerprint"]
    return fingerprint


def test_dry_run_prints_the_placement_group_and_actors(tmp_path: Path, storage: Path) -> None:
    recipe = write_recipe(tmp_path, "gpt", spare_nodes=1)
    result = trainctl(
        "launch",
        str(recipe),
        "--scheduler",
        "ray",
        "--dry-run",
        "--json",
        "--job-id",
        "dry",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    ray = result.json()["ray"]
    group = ray["placement_group"]
    assert group["strategy"] == "STRICT_SPREAD" and len(group["bundles"]) == 3
    assert group["active_bundles"] == 2 and group["spare_bundles"] == 1
    indexes = [a["scheduling_strategy"]["placement_group_bundle_index"] for a in ray["actors"]]
    assert indexes == [0, 1, 2]
    assert not (storage / "jobs" / "dry").exists()


def test_a_placement_the_cluster_cannot_hold_is_refused_and_nothing_starts(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster
) -> None:
    recipe = write_recipe(tmp_path, "big", nodes=4)
    result = ray_launch(recipe, "big", storage, ray_cluster.address)
    assert result.returncode == 2, result.stderr
    assert "--scheduler ray: the Ray cluster cannot hold this job" in result.stderr
    assert "needs 4 Ray node(s)" in result.stderr and "Traceback" not in result.stderr
    assert not (storage / "jobs" / "big").exists()


def test_a_cluster_short_of_free_nodes_now_ends_the_job_for_a_later_resume(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster
) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=ray_cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        busy = placement_group([{"CPU": 1}])  # another user's work holds one of three nodes
        assert busy.wait(30)
        recipe = write_recipe(tmp_path, "gpt", spare_nodes=1)
        result = ray_launch(recipe, "short", storage, ray_cluster.address)
        remove_placement_group(busy)
    finally:
        ray.shutdown()
    assert result.returncode == 1, result.stderr
    state = read_state(storage, "short")
    assert state["state"] == "failed" and state["attempts"] == []
    assert "1 busy" in state["reason"] and "trainctl resume short" in state["reason"]


def test_two_nodes_finish_with_the_local_fingerprint(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster, local_fingerprint: str
) -> None:
    recipe = write_recipe(tmp_path, "gpt", config={**SLOW})
    result = ray_launch(recipe, "two", storage, ray_cluster.address)
    assert result.returncode == 0, result.stderr
    assert result.json()["fingerprint"] == local_fingerprint
    state = read_state(storage, "two")
    assert state["scheduler"] == "ray"
    names = [n["name"] for n in state["nodes"]]
    assert len(names) == 2 and set(names) <= set(ray_cluster.workers)  # Ray node ids
    status = trainctl("status", "two", "--json", storage=storage).json()
    assert status["ray"]["placement_group"] == state["scheduler_job_id"].split("@")[0]


def test_xid_79_on_a_bundles_node_keeps_that_ray_node_out(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster, local_fingerprint: str
) -> None:
    broken = sorted(ray_cluster.nvml_files)[0]
    ray_cluster.nvml_files[broken].write_text("device_count=1\ngpu.0.xid=79\n")
    try:
        recipe = write_recipe(tmp_path, "gpt", config={**SLOW}, spare_nodes=1)
        result = ray_launch(recipe, "xid", storage, ray_cluster.address)
    finally:
        ray_cluster.reset_nvml()
    assert result.returncode == 0, result.stderr
    assert list(blocklist(storage, "xid")) == [broken]
    assert "XID 79" in json.dumps(blocklist(storage, "xid")[broken])
    assert result.json()["fingerprint"] == local_fingerprint


def test_a_ray_node_removed_mid_run_is_blamed_excluded_and_its_spare_used(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster, local_fingerprint: str
) -> None:
    recipe = write_recipe(tmp_path, "gpt", config={**SLOW}, spare_nodes=1)
    code, out, err, victim = run_losing_a_node(recipe, "lost", storage, ray_cluster, tmp_path)
    assert code == 0, err
    assert json.loads(out)["fingerprint"] == local_fingerprint
    assert list(blocklist(storage, "lost")) == [victim]
    state = read_state(storage, "lost")
    assert state["attempts"][0]["blamed"] == victim
    assert victim not in state["attempts"][-1]["nodes"] and len(state["attempts"][-1]["nodes"]) == 2


def test_a_ray_node_removed_without_a_spare_shrinks_the_job_and_reshards(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster
) -> None:
    recipe = write_recipe(tmp_path, "gpt", config={**SLOW}, min_nodes=1)
    code, _, err, victim = run_losing_a_node(recipe, "shrink", storage, ray_cluster, tmp_path)
    assert code == 0, err
    assert list(blocklist(storage, "shrink")) == [victim]
    state = read_state(storage, "shrink")
    assert [a["world_size"] for a in state["attempts"]] == [2, 1]
    assert state["state"] == "succeeded" and state["final_step"] == 30
    assert victim not in state["attempts"][-1]["nodes"]
    items = events(storage, "shrink")
    restored = [e for e in items if e["kind"] == "restored_fingerprint"]
    assert len(restored) == 1
    step = restored[0]["data"]["step"]
    saved = [
        e["data"]["fingerprint"]
        for e in items
        if e["kind"] == "saved_fingerprint" and e["data"]["step"] == step and e["attempt"] == 0
    ]
    # 2 ranks saved, 1 rank restored on the Ray node left: bit for bit the saved weights
    assert saved, f"no fingerprint saved at step {step}"
    assert saved[0] == restored[0]["data"]["fingerprint"]


def test_no_placement_left_ends_the_job_for_a_requeue_and_resume_picks_it_up(
    tmp_path: Path, storage: Path, ray_cluster: RayTestCluster, local_fingerprint: str
) -> None:
    recipe = write_recipe(tmp_path, "gpt", config={**SLOW})
    code, _, err, victim = run_losing_a_node(
        recipe, "requeue", storage, ray_cluster, tmp_path, replace=False
    )
    assert code == 1, err
    assert list(blocklist(storage, "requeue")) == [victim]
    try:
        resumed = trainctl(
            "resume",
            "requeue",
            "--json",
            storage=storage,
            timeout_s=JOB_TIMEOUT_S,
            RAY_ADDRESS=ray_cluster.address,
        )
    finally:
        assert_no_leftovers("requeue")
        ray_cluster.add_worker(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["fingerprint"] == local_fingerprint
    state = read_state(storage, "requeue")
    assert victim not in state["attempts"][-1]["nodes"]
    assert any(e["kind"] == "job_resumed" for e in events(storage, "requeue"))
