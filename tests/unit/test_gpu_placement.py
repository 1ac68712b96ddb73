"""Putting ranks on GPUs, decided without a GPU: worker counts from NVML readings and
CUDA_VISIBLE_DEVICES, the device each rank binds (CPU stand-ins for CUDA), the recipe values,
and the collective timeout derived from step times."""

from __future__ import annotations

import pytest
import torch

from trainctl.health.readings import GpuReading, NvmlReading, NvmlStatus
from trainctl.launch.plan import Facts, plan_attempt, render_plan
from trainctl.launch.workers import (
    WorkerCountError,
    requested_workers,
    visible_gpus,
    with_workers,
    workers_per_node,
)
from trainctl.runtime.collective_timeout import WARMUP_STEPS, CollectiveTimeout
from trainctl.runtime.device import DeviceError, choose_device, default_backend, to_device
from trainctl.spec import HealthSpec, JobSpec


def nvml(count: int) -> NvmlReading:
    return NvmlReading(
        NvmlStatus.AVAILABLE, "ok", "550.54", tuple(GpuReading(i) for i in range(count))
    )


MISSING = NvmlReading(NvmlStatus.LIBRARY_MISSING, "NVML unavailable: no GPU probes")


@pytest.mark.parametrize(
    ("reading", "environ", "expected"),
    [
        (nvml(8), {}, 8),
        (nvml(8), {"CUDA_VISIBLE_DEVICES": "0,1"}, 2),  # Slurm's --gpus-per-node=2
        (nvml(8), {"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2,GPU-c3"}, 3),  # UUIDs
        (nvml(2), {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2),  # never more than NVML lists
        (nvml(8), {"CUDA_VISIBLE_DEVICES": ""}, 0),
        (nvml(8), {"CUDA_VISIBLE_DEVICES": "-1"}, 0),
        (nvml(8), {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),
        (nvml(0), {}, 0),
        (MISSING, {}, 0),
        (MISSING, {"CUDA_VISIBLE_DEVICES": "0,1"}, 2),  # NVML absent: trust the mask
    ],
)
def test_visible_gpus(reading: NvmlReading, environ: dict[str, str], expected: int) -> None:
    assert visible_gpus(reading, environ) == expected


def test_workers_per_node() -> None:
    assert workers_per_node(3, 8, "node-0", nvml(8)) == 3  # a number is a number
    assert workers_per_node("gpu", 8, "node-0", nvml(8)) == 8
    assert workers_per_node("auto", 4, "node-0", nvml(4)) == 4
    assert workers_per_node("auto", 0, "node-0", MISSING) == 1  # not one per CPU core
    with pytest.raises(WorkerCountError, match="node-3 has no visible NVIDIA GPU"):
        workers_per_node("gpu", 0, "node-3", MISSING)


def test_the_planned_worker_count_is_replaced_in_torchrun_argv() -> None:
    argv = ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=gpu", "x.py"]
    assert requested_workers(argv) == "gpu"
    assert requested_workers([*argv[:4], "--nproc-per-node=4"]) == 4
    assert requested_workers(argv[:4]) is None
    assert with_workers(argv, 8) == [*argv[:4], "--nproc-per-node=8", "x.py"]


@pytest.mark.parametrize(
    ("value", "expected"), [(4, 4), ("4", 4), ("gpu", "gpu"), ("auto", "auto")]
)
def test_nproc_per_node_values(value: object, expected: object) -> None:
    assert JobSpec(name="j", script="/x.py", nproc_per_node=value).nproc_per_node == expected


@pytest.mark.parametrize("value", [0, 65, "gpus", "cpu", True, -1, 100.0, 2.5])
def test_bad_nproc_per_node_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="1 to 64, gpu or auto"):
        JobSpec(name="j", script="/x.py", nproc_per_node=value)


def test_a_per_gpu_plan_leaves_the_world_size_to_the_nodes() -> None:
    spec = JobSpec(name="j", script="/x.py", nodes=2, nproc_per_node="gpu")
    facts = Facts(python="/py", storage_root="/s", run_dir="/r", rdzv_port=29500)
    plan = plan_attempt(spec, facts, "job", 0, ("node-0", "node-1"))
    assert spec.per_gpu and spec.world_size == 0 and plan.world_size == 0
    assert all("--nproc-per-node=gpu" in node.argv for node in plan.nodes)
    assert "world size one worker per GPU of each node" in render_plan(plan)


@pytest.mark.parametrize(
    ("local_rank", "cuda", "count", "expected"),
    [
        (0, False, 0, torch.device("cpu")),
        (3, False, 0, torch.device("cpu")),  # CPU hosts: nothing changes
        (0, True, 8, torch.device("cuda", 0)),
        (7, True, 8, torch.device("cuda", 7)),
    ],
)
def test_each_rank_binds_its_own_gpu(
    local_rank: int, cuda: bool, count: int, expected: torch.device
) -> None:
    assert choose_device(local_rank, cuda_available=cuda, device_count=count, environ={}) == (
        expected
    )


def test_more_ranks_than_gpus_is_refused_not_shared() -> None:
    with pytest.raises(
        DeviceError, match=r"local rank 2 .* 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1\)"
    ):
        choose_device(
            2, cuda_available=True, device_count=2, environ={"CUDA_VISIBLE_DEVICES": "0,1"}
        )
    with pytest.raises(DeviceError, match="lists no device"):
        choose_device(0, cuda_available=True, device_count=0, environ={})


def test_backends_and_batches() -> None:
    assert default_backend(torch.device("cpu")) == "gloo"
    assert default_backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
    batch = (torch.arange(4), torch.ones(2))
    assert to_device(batch, torch.device("cpu")) is batch  # no copy on the CPU
    on_meta = to_device(batch, torch.device("meta"))  # stands in for a GPU: a real move
    assert all(tensor.device.type == "meta" for tensor in on_meta)


def derived(health: HealthSpec, times: list[float], checkpointing: bool = False) -> list[float]:
    applied: list[float] = []
    timeout = CollectiveTimeout(health, checkpointing, applied.append)
    for step_time in times:
        timeout.observe(step_time)
    return applied


def test_collective_timeout_follows_the_step_times() -> None:
    health = HealthSpec()  # floor 60 s, k 5, stack dumps 15 s, checkpoint allowance 300 s
    # until warm: the first-step allowance + 2 stack windows + a minute, past trainctl's own
    assert CollectiveTimeout.initial_s(health) == 600.0 + 30.0 + 60.0
    assert derived(health, [0.5] * (WARMUP_STEPS - 1)) == []  # too few step times yet
    assert derived(health, [0.5] * WARMUP_STEPS) == [150.0]  # 2 x (floor + stack window)
    assert derived(health, [0.5] * WARMUP_STEPS, checkpointing=True) == [450.0]
    assert derived(health, [20.0] * WARMUP_STEPS) == [230.0]  # 2 x (5 x 20 s + 15 s)
    # applied again only when it moves by more than 20 %: once, not every step
    assert derived(health, [0.5] * 50) == [150.0]
    assert derived(health, [0.5] * WARMUP_STEPS + [30.0] * 2) == [150.0, 330.0]
    pinned = HealthSpec(hang_timeout_s=900.0)
    assert CollectiveTimeout.initial_s(pinned) == 900.0 + 30.0 + 60.0
    assert derived(pinned, [0.5] * WARMUP_STEPS) == [1830.0]
    assert derived(health, [None, -1.0]) == []  # type: ignore[list-item]
