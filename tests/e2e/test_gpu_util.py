"""End-to-end GPU utilisation: two simulated nodes, one busy and one idle, through the real
pynvml calls into the fake libnvidia-ml.so.1 (one file per node through the recipe's
`node_env`), the node agents' sampler, the control channel, the controller's recorder and the
job store, out through `trainctl status --json`, `trainctl health JOB` and `trainctl report`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.harness import events, launch, trainctl
from tests.fakenvml.build import build_or_skip

pytestmark = pytest.mark.e2e

PACED = str(REPO / "tests" / "e2e" / "scripts" / "paced.py")


def gpus(util: int, memory_mib: int, power_mw: int, clock_reasons: str) -> str:
    lines = ["device_count=2"]
    for index in range(2):
        lines += [
            f"gpu.{index}.util_gpu={util + index}",
            f"gpu.{index}.util_memory={util // 2}",
            f"gpu.{index}.memory_used_mib={memory_mib}",
            f"gpu.{index}.memory_total_mib=81920",
            f"gpu.{index}.power_mw={power_mw}",
            f"gpu.{index}.power_limit_mw=700000",
            f"gpu.{index}.sm_clock_mhz=1755",
            f"gpu.{index}.sm_clock_max_mhz=1980",
            f"gpu.{index}.clock_reasons={clock_reasons}",
        ]
    return "\n".join(lines) + "\n"


def test_busy_and_idle_nodes_reach_status_health_and_report(storage: Path, tmp_path: Path) -> None:
    lib = build_or_skip(tmp_path / "fakenvml")
    busy, idle = tmp_path / "node-0.nvml", tmp_path / "node-1.nvml"
    busy.write_text(gpus(90, 61440, 650000, "0x4"))  # ~90 %, power-capped
    idle.write_text(gpus(2, 1024, 90000, "0x1"))  # ~2 %, clocks down: GPU idle

    def env(fault_file: Path) -> dict[str, str]:
        previous = os.environ.get("LD_LIBRARY_PATH")
        path = str(lib) + (os.pathsep + previous if previous else "")
        return {"LD_LIBRARY_PATH": path, "FAKE_NVML_FILE": str(fault_file)}

    recipe = tmp_path / "gpu-util.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "gpu-util",
                "script": PACED,
                "nodes": 2,
                "nproc_per_node": 1,
                "max_steps": 40,
                "config": {"step_sleep_s": 0.1},
                "health": {"probe_interval_s": 0.3, "gpu_idle_window_s": 30},
                "node_env": {"node-0": env(busy), "node-1": env(idle)},
                "launch": {"stop_grace_s": 1},
            }
        )
    )

    result = launch(str(recipe), job_id="gpu", storage=storage)  # asserts nothing is left
    assert result.returncode == 0, result.stderr

    status = trainctl("status", "gpu", "--json", storage=storage)
    assert status.returncode == 0, status.stderr
    nodes = {node["name"]: node["gpu"] for node in status.json()["nodes"]}
    node0, node1 = nodes["node-0"], nodes["node-1"]
    assert node0["num_gpus"] == 2 and node0["num_samples"] >= 2
    assert (node0["mean_util_pct"], node0["min_util_pct"]) == (90.5, 90.0)
    assert (node1["mean_util_pct"], node1["min_util_pct"]) == (2.5, 2.0)
    assert node0["memory_used_bytes"] == 2 * 61440 * 2**20
    assert node0["memory_total_bytes"] == 2 * 81920 * 2**20
    assert node0["idle"] is None
    assert node1["idle"]["idle"] is True and node1["idle"]["others_util_pct"] == 90.5

    flagged = [e for e in events(storage, "gpu") if e["kind"] == "gpu_idle"]
    assert [e["node"] for e in flagged] == ["node-1"]  # once per episode, not per sample
    assert flagged[0]["data"]["mean_util_pct"] == 2.5
    assert "gpu_idle_cleared" not in {e["kind"] for e in events(storage, "gpu")}

    text = trainctl("status", "gpu", storage=storage)
    assert "GPUs idle: node-1: GPUs 2.5% busy" in text.stdout

    health = trainctl("health", "gpu", "--json", storage=storage)
    assert health.returncode == 0, health.stderr
    readings = health.json()["gpus"]
    assert [g["gpu_util_pct"] for g in readings["node-0"]["gpus"]] == [90, 91]
    assert readings["node-0"]["gpus"][0]["power_w"] == 650.0
    assert readings["node-0"]["gpus"][0]["clock_event_reason_names"] == ["sw_power_cap"]
    assert readings["node-1"]["gpus"][1]["clock_event_reason_names"] == ["gpu_idle"]
    table = trainctl("health", "gpu", storage=storage).stdout
    rows = [line.split() for line in table.splitlines() if line.startswith("node-1 ")]
    assert [
        "node-1",
        "0",
        "2%",
        "1.0/80.0G",
        "90W/700W",
        "40C",
        "1755/1980",
        "0/0",
        "gpu_idle",
    ] in (rows)

    report = trainctl("report", "gpu", "--json", "--out", str(tmp_path / "r.html"), storage=storage)
    assert report.returncode == 0, report.stderr
    per_attempt = report.json()["gpu"]["attempts"]["0"]
    assert per_attempt["node-0"]["mean_util_pct"] == 90.5
    assert per_attempt["node-1"]["mean_util_pct"] == 2.5
