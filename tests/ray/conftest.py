"""A real multi-node Ray cluster on this machine, started once per session.

A head node that runs no tasks (0 CPUs) and three worker raylets with one CPU each, every
worker carrying the fake libnvidia-ml.so.1 and its own NVML file in its environment (Ray's
workers, and so the trainctl agents they start, inherit the raylet's). Torn down at the end,
and checked: no raylet, GCS or Ray worker process is left behind.

Without `ray` the tests skip; `TRAINCTL_REQUIRE_RAY=1` (CI sets it) turns that into a failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakenvml.build import build_or_skip

NUM_WORKERS = 3
HEALTHY = "device_count=1\n"


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("TRAINCTL_REQUIRE_RAY") == "1":
            pytest.fail("TRAINCTL_REQUIRE_RAY=1 but ray is not installed", pytrace=False)
        pytest.skip("ray is not installed (pip install trainctl[ray])")


@dataclass
class RayTestCluster:
    cluster: Any
    address: str
    nvml_dir: Path
    nvml_files: dict[str, Path] = field(default_factory=dict)
    """Ray node id -> the fake NVML file its raylet's processes read."""
    workers: dict[str, Any] = field(default_factory=dict)
    """Ray node id -> the cluster_utils node handle."""
    count: int = 0

    def add_worker(self, directory: Path) -> str:
        nvml = directory / f"ray-node-{self.count}.nvml"
        self.count += 1
        nvml.write_text(HEALTHY)
        node = self.cluster.add_node(
            num_cpus=1,
            env_vars={"LD_LIBRARY_PATH": str(self.nvml_dir), "FAKE_NVML_FILE": str(nvml)},
        )
        self.cluster.wait_for_nodes()
        self.nvml_files[node.node_id] = nvml
        self.workers[node.node_id] = node
        return str(node.node_id)

    def remove_worker(self, node_id: str) -> None:
        self.cluster.remove_node(self.workers.pop(node_id), allow_graceful=False)

    def reset_nvml(self) -> None:
        for path in self.nvml_files.values():
            path.write_text(HEALTHY)


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if any(name in line for name in ("raylet", "gcs_server", "ray::", "default_worker.py"))
    ]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    _require_ray()
    from ray.cluster_utils import Cluster

    directory = tmp_path_factory.mktemp("ray")
    nvml_dir = build_or_skip(directory / "fakenvml")
    before = set(ray_processes())
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    handle = RayTestCluster(cluster, cluster.address, nvml_dir)
    try:
        for _ in range(NUM_WORKERS):
            handle.add_worker(directory)
        yield handle
    finally:
        cluster.shutdown()
    left = [line for line in ray_processes() if line not in before]
    assert not left, f"Ray processes left behind: {left}"
