"""``nproc_per_node: gpu`` on real 2-node jobs: each node's agent counts its GPUs through the
real pynvml code paths (a fake ``libnvidia-ml.so.1`` per node, see tests/fakenvml) narrowed by
``CUDA_VISIBLE_DEVICES``, and starts one worker per GPU. The workers compute on the CPU here
(no CUDA): the same job with an explicit worker count ends with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.harness import events, launch, read_state, write_recipe
from tests.e2e.test_health import nvml_env
from tests.fakenvml.build import build_or_skip


@pytest.fixture(scope="module")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_or_skip(tmp_path_factory.mktemp("fakenvml"))


def gpu_nodes(tmp_path: Path, lib: Path, node1_devices: int) -> dict[str, dict[str, str]]:
    node0, node1 = tmp_path / "node-0.nvml", tmp_path / "node-1.nvml"
    node0.write_text("device_count=2\n")
    node1.write_text(f"device_count={node1_devices}\n")
    # node-1's NVML lists more GPUs than its allocation: the scheduler's mask decides
    narrowed = {"CUDA_VISIBLE_DEVICES": "2,3"} if node1_devices > 2 else {}
    return {"node-0": nvml_env(lib, node0), "node-1": {**nvml_env(lib, node1), **narrowed}}


def test_one_worker_per_visible_gpu(storage: Path, tmp_path: Path, fake_nvml_dir: Path) -> None:
    common = {"checkpoint": {"interval_steps": 0}, "max_steps": 4}
    per_gpu = write_recipe(
        tmp_path,
        "per-gpu",
        nproc_per_node="gpu",
        node_env=gpu_nodes(tmp_path, fake_nvml_dir, node1_devices=4),
        **common,
    )
    result = launch(str(per_gpu), "--json", job_id="per-gpu", storage=storage)
    assert result.returncode == 0, result.stderr
    started = {
        e["node"]: e["data"]["workers"]
        for e in events(storage, "per-gpu")
        if e["kind"] == "node_started"
    }
    assert started == {"node-0": 2, "node-1": 2}
    assert read_state(storage, "per-gpu")["attempts"][0]["world_size"] == 4
    # rank 0 says the world size; the rendezvous's join order decides which node hosts it
    logs = [(storage / "jobs" / "per-gpu" / "logs" / f"{n}.log").read_text() for n in started]
    assert any("world size 4" in log for log in logs), logs

    fixed = write_recipe(tmp_path, "fixed-4", nproc_per_node=2, **common)
    oracle = launch(str(fixed), "--json", job_id="fixed-4", storage=storage)
    assert oracle.returncode == 0, oracle.stderr
    assert result.json()["fingerprint"] == oracle.json()["fingerprint"]


def test_a_gpu_job_on_a_node_without_gpus_fails_with_the_reason(
    storage: Path, tmp_path: Path, fake_nvml_dir: Path
) -> None:
    recipe = write_recipe(
        tmp_path,
        "no-gpu",
        nproc_per_node="gpu",
        node_env=gpu_nodes(tmp_path, fake_nvml_dir, node1_devices=0),
        checkpoint={"interval_steps": 0},
        max_steps=4,
        recovery={"crash_loop_limit": 1},
    )
    result = launch(str(recipe), job_id="no-gpu", storage=storage)
    assert result.returncode != 0
    state = read_state(storage, "no-gpu")
    assert state["state"] == "failed"
    assert "node-1 has no visible NVIDIA GPU" in state["reason"], state["reason"]
    assert "Traceback" not in result.stderr


def test_a_watchdog_dump_reaches_the_job_store(storage: Path, tmp_path: Path) -> None:
    """NCCL's watchdog dumps a rank's recorder and tears the rank down: the agent sends the
    dump with the attempt's exit, and it lands beside the attempt's stacks."""
    recipe = write_recipe(
        tmp_path,
        "watchdog",
        script=str(Path(__file__).parent / "scripts" / "watchdog_dump.py"),
        checkpoint={"interval_steps": 0},
        recovery={"crash_loop_limit": 1},
        launch={"stop_grace_s": 1},
    )
    result = launch(str(recipe), job_id="watchdog", storage=storage)
    assert result.returncode != 0
    stacks = storage / "jobs" / "watchdog" / "stacks" / "attempt-0"
    saved = list(stacks.glob("*-rank-0.flight_recorder.json"))
    assert len(saved) == 1, sorted(p.name for p in stacks.parent.rglob("*"))
    dump = json.loads(saved[0].read_text())
    assert dump["source"] == "nccl_trace_rank_0"
    assert dump["entries"][-1] == {
        "collective_seq_id": 7,
        "process_group": ["0", "default_pg"],
        "profiling_name": "nccl:all_reduce",
        "state": "started",
        "retired": False,
        "is_p2p": False,
    }


def test_a_per_gpu_job_whose_rank_never_reports_is_a_hang(
    storage: Path, tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """With one worker per GPU the world size is known only when the nodes start: ranks that
    never report a step must still be watched (first-step hang), and the stuck node blamed."""
    one_gpu = tmp_path / "one.nvml"
    one_gpu.write_text("device_count=1\n")
    recipe = write_recipe(
        tmp_path,
        "gpu-hang",
        nproc_per_node="gpu",
        spare_nodes=1,
        max_steps=4,
        node_env={f"node-{i}": nvml_env(fake_nvml_dir, one_gpu) for i in range(3)},
        checkpoint={"interval_steps": 0},
        config={"spin_at_step": 1, "spin_node": "node-1"},
        health={"first_step_allowance_s": 30, "hang_floor_s": 4, "stack_dump_timeout_s": 5},
        launch={"stop_grace_s": 1},
    )
    result = launch(str(recipe), "--json", job_id="gpu-hang", storage=storage)
    assert result.returncode == 0, result.stderr
    first = read_state(storage, "gpu-hang")["attempts"][0]
    assert first["world_size"] == 2
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1"), first["reason"]
    assert first["reason"].startswith("hang: no progress"), first["reason"]
