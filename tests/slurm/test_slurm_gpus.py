"""GPUs on a real Slurm cluster: the session's cluster gives every node two fake GPUs
(``Gres=gpu:h100:2``, device files under its root: tests/slurm/cluster.py).

A job that asks for them — in the recipe's ``slurm:`` section or with `launch`'s flags, in
the `--gpus-per-node` form or the `--gres` form — gets them in every worker: the agent's
`srun` step inherits the allocation's GPUs, and torchrun and its workers the step's
environment. A request the cluster cannot satisfy ends `launch` with exit 2 and one message,
and leaves no job in the store or in Slurm. The checks of the ``slurm:`` section agree with
the real sbatch.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.harness import Result, trainctl
from tests.slurm.cluster import LocalSlurmCluster
from trainctl.launch import slurm_request
from trainctl.launch.slurm import SlurmClient

pytestmark = pytest.mark.e2e

SCRIPT = REPO / "tests" / "slurm" / "gpu_env.py"


def gpu_recipe(directory: Path, slurm: dict[str, Any]) -> Path:
    out = directory / "seen"
    out.mkdir()
    recipe = {
        "name": "gpus",
        "script": str(SCRIPT),
        "uses_runtime": False,
        "nodes": 2,
        "nproc_per_node": 2,
        "env": {"GPU_ENV_DIR": str(out)},
        "slurm": slurm,
    }
    path = directory / "gpus.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_on(
    cluster: LocalSlurmCluster, storage: Path, recipe: Path, job: str, *flags: str
) -> Result:
    return trainctl(
        "launch",
        str(recipe),
        "--scheduler",
        "slurm",
        "--job-id",
        job,
        "--json",
        *flags,
        storage=storage,
        SLURM_CONF=str(cluster.conf),
    )


def wait_succeeded(cluster: LocalSlurmCluster, storage: Path, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = trainctl("status", job, "--json", storage=storage, SLURM_CONF=str(cluster.conf))
        assert result.returncode == 0, result.stderr
        data = result.json()
        if data["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    log = storage / "jobs" / job / "slurm.log"
    assert data.get("state") == "succeeded", (data, log.read_text(errors="replace")[-3000:])
    return data


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("section", "flags", "directive"),
    [
        ({"gpus_per_node": 2, "gpu_type": "h100"}, (), "--gpus-per-node=h100:2"),
        ({"gpu_request": "gres"}, ("--gpus-per-node", "2"), "--gres=gpu:2"),
    ],
    ids=["recipe-gpus-per-node", "flag-gres"],
)
def test_workers_get_the_gpus_the_job_asked_for(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    section: dict[str, Any],
    flags: tuple[str, ...],
    directive: str,
) -> None:
    recipe = gpu_recipe(tmp_path, section)
    job = f"gpu-{len(flags)}"
    result = launch_on(slurm_cluster, storage, recipe, job, *flags)
    assert result.returncode == 0, result.stderr
    script = (storage / "jobs" / job / "batch.sbatch").read_text()
    assert f"#SBATCH {directive}\n" in script
    stored = yaml.safe_load((storage / "jobs" / job / "spec.yaml").read_text())
    assert stored["slurm"]["gpus_per_node"] == 2  # resume and requeues see the same request
    wait_succeeded(slurm_cluster, storage, job)
    seen = [json.loads(p.read_text()) for p in sorted((tmp_path / "seen").glob("rank-*.json"))]
    assert len(seen) == 4, seen  # 2 nodes x 2 workers
    nodes = {s["SLURMD_NODENAME"] for s in seen}
    assert len(nodes) == 2 and nodes <= set(slurm_cluster.nodes), nodes
    for worker in seen:
        assert worker["SLURM_GPUS_ON_NODE"] == "2", worker
        assert worker["CUDA_VISIBLE_DEVICES"] is not None, worker
        assert len(worker["CUDA_VISIBLE_DEVICES"].split(",")) == 2, worker
        # Set by slurmstepd for a step that holds GPUs, never by the batch step: the agent's
        # srun step itself was given the GPUs (not just the batch host's variables passed on).
        assert worker["SLURM_STEP_GPUS"] == worker["CUDA_VISIBLE_DEVICES"], worker
        assert worker["SLURM_STEP_ID"] not in (None, "batch"), worker  # an agent's srun step


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("section", "flags"),
    [
        ({}, ("--gpus-per-node", "4")),  # nodes have 2
        ({}, ("--gpus-per-node", "a100:1")),  # no such type
        ({"gpus_per_node": 3, "gpu_request": "gres"}, ()),
        ({}, ("--reservation", "nope")),
        ({}, ("--partition", "nope")),
    ],
    ids=["too-many", "unknown-type", "gres-too-many", "no-reservation", "no-partition"],
)
def test_request_the_cluster_cannot_satisfy_fails_at_launch(
    slurm_cluster: LocalSlurmCluster,
    slurm: SlurmClient,
    storage: Path,
    tmp_path: Path,
    section: dict[str, Any],
    flags: tuple[str, ...],
) -> None:
    recipe = gpu_recipe(tmp_path, section)
    result = launch_on(slurm_cluster, storage, recipe, "refused", *flags)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Slurm refuses the job's request:" in result.stderr
    assert "fix:" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no job id: there is no job
    assert not (storage / "jobs").exists() or not any((storage / "jobs").iterdir())
    assert slurm_cluster.active_jobs() == []


# What each check accepts, sbatch parses (it may still refuse the amount: "allocation failure");
# what it refuses, sbatch refuses too, or reads otherwise.
MEM = {"0": True, "512": True, "10k": True, "5MB": True, "2G": True, "1.5G": False, "-1": False}
TIMES = {"30": True, "1:30": True, "2-0": True, "2-12:30:00": True, "UNLIMITED": True, "4h": False}


@pytest.mark.timeout(120)
def test_section_checks_agree_with_sbatch(slurm_cluster: LocalSlurmCluster) -> None:
    def sbatch_parses(option: str) -> bool:
        run = subprocess.run(
            ["sbatch", "--test-only", option],
            input="#!/bin/bash\ntrue\n",
            env=slurm_cluster.env,
            capture_output=True,
            text=True,
            timeout=20,
        )
        # 0: it would run; 1 with "allocation failure": parsed, but too much; else: refused.
        return run.returncode == 0 or "allocation failure" in run.stderr

    def ours(check: Any, value: str) -> bool:
        try:
            check(value)
        except slurm_request.SlurmValueError:
            return False
        return True

    for value, good in MEM.items():
        assert ours(slurm_request.check_mem, value) is good, value
        if good:
            assert sbatch_parses(f"--mem={value}"), value
    assert not sbatch_parses("--mem=1.5G")
    for value, good in TIMES.items():
        assert ours(slurm_request.check_time_limit, value) is good, value
        assert sbatch_parses(f"--time={value}") is good, value
