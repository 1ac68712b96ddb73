"""How many workers a node starts when the recipe says ``nproc_per_node: gpu`` or ``auto``.

The plan cannot know a node's GPUs (the controller may run on a host without any), so it
passes the word through to torchrun's ``--nproc-per-node=gpu|auto`` and each node's agent
replaces it with a number after its preflight probe: the GPUs NVML lists, narrowed to
``CUDA_VISIBLE_DEVICES`` where the scheduler set it (Slurm does for a ``--gpus-per-node``
allocation, and NVML ignores it). torchrun's own ``gpu`` would ask CUDA in the torchrun process
instead, and its ``auto`` means one worker per CPU core on a host without GPUs: on a node
without GPUs trainctl's ``auto`` means one worker.

Pure: readings and the environment in, a number or a `WorkerCountError` out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trainctl.health.readings import NvmlReading, NvmlStatus

NPROC_FLAG = "--nproc-per-node="
HIDDEN = ("", "-1", "NoDevFiles")
"""`CUDA_VISIBLE_DEVICES` values that hide every GPU (Slurm writes ``NoDevFiles`` when an
allocation asked for GPUs it could not bind)."""


class WorkerCountError(ValueError):
    """The node cannot start the workers the recipe asked for (one sentence, for people)."""


def visible_gpus(nvml: NvmlReading, environ: Mapping[str, str]) -> int:
    """The GPUs this node's workers may use: NVML's devices, or the entries of
    ``CUDA_VISIBLE_DEVICES`` when it is set (never more than NVML lists, when NVML worked)."""
    listed = len(nvml.gpus) if nvml.status is NvmlStatus.AVAILABLE else None
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return listed or 0
    if mask.strip() in HIDDEN:
        return 0
    entries = [entry for entry in mask.split(",") if entry.strip()]
    return len(entries) if listed is None else min(len(entries), listed)


def workers_per_node(requested: int | str, gpus: int, node: str, nvml: NvmlReading) -> int:
    """The number of workers `node` starts for the recipe's `requested` value."""
    if isinstance(requested, int):
        return requested
    if gpus > 0:
        return gpus
    if requested == "auto":
        return 1
    why = nvml.message if nvml.status is not NvmlStatus.AVAILABLE else "NVML lists no GPU"
    raise WorkerCountError(
        f"nproc_per_node is 'gpu' but {node} has no visible NVIDIA GPU ({why}; "
        "CUDA_VISIBLE_DEVICES narrows what NVML lists): run it on GPU nodes, or set "
        "nproc_per_node to a number or to 'auto'"
    )


def requested_workers(argv: Sequence[str]) -> int | str | None:
    """The ``--nproc-per-node`` value of a planned torchrun argv (None: not there)."""
    for arg in argv:
        if arg.startswith(NPROC_FLAG):
            value = arg[len(NPROC_FLAG) :]
            return int(value) if value.isdigit() else value
    return None


def with_workers(argv: Sequence[str], count: int) -> list[str]:
    """`argv` with its ``--nproc-per-node`` replaced by `count`."""
    return [f"{NPROC_FLAG}{count}" if arg.startswith(NPROC_FLAG) else arg for arg in argv]
