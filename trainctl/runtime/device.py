"""Which device a worker computes on, chosen and bound before its process group starts.

On a host with CUDA each worker binds ``cuda:LOCAL_RANK`` (torchrun numbers a node's workers
0..N-1, and ``nproc_per_node: gpu`` starts one per visible GPU) *before* it joins the process
group: NCCL then builds its communicator on that GPU, and nothing ever lands on GPU 0 by
default (the classic "every rank allocates on cuda:0" bug). On a host without CUDA everything
stays on the CPU, exactly as before.

`choose_device` is pure (tested with CPU stand-ins); `bind` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Batch = tuple[torch.Tensor, ...]


class DeviceError(RuntimeError):
    """The worker cannot have a GPU of its own (one sentence, for people)."""


def choose_device(
    local_rank: int, *, cuda_available: bool, device_count: int, environ: Mapping[str, str]
) -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.

    More workers than visible GPUs is refused rather than sharing GPUs silently (two ranks on
    one GPU halve its memory and, with NCCL, deadlock or fail in a collective).
    """
    if not cuda_available:
        return torch.device("cpu")
    if device_count < 1:
        raise DeviceError("CUDA is available but lists no device")
    if not 0 <= local_rank < device_count:
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DeviceError(
            f"local rank {local_rank} has no GPU of its own: this node shows "
            f"{device_count} GPU(s){shown}; start at most {device_count} worker(s) per node, "
            "e.g. nproc_per_node: gpu"
        )
    return torch.device("cuda", local_rank)


def bind(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def default_backend(device: torch.device) -> str:
    """gloo on the CPU; on a GPU, NCCL for CUDA tensors and gloo for CPU ones (async DCP
    saves and trainctl's own small collectives run on CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def to_device(batch: Batch, device: torch.device) -> Batch:
    """`batch` on `device`. From the CPU to a GPU the copy goes through pinned memory and is
    asynchronous (ordered on the current stream before the step's kernels)."""
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    return tuple(
        tensor.pin_memory().to(device, non_blocking=True)
        if pin and tensor.device.type == "cpu"
        else tensor.to(device)
        for tensor in batch
    )
