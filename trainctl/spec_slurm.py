"""The recipe's ``slurm:`` section (`SlurmSpec`, a section of `trainctl.spec.JobSpec`).

Its own module because its checks are many: each one is `trainctl.launch.slurm_request`'s,
shared with the sbatch renderer, and raises `SlurmValueError`, which pydantic reports at the
field's path and `trainctl.recipe` turns into one `UserError` (``recipe.yaml:
slurm.account``). Follows `trainctl.spec`'s style: a docstring under every field, each
default stated there only.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

from trainctl.launch import slurm_request
from trainctl.launch.slurm_request import DEFAULT_SIGNAL_GRACE_S, GpuRequest


def _extra_arg(value: str, info: ValidationInfo) -> str:
    data = info.data
    gres = data.get("gpu_request") == "gres" and data.get("gpus_per_node", 0) > 0
    return slurm_request.check_extra_arg(value, gres)


ExtraArg = Annotated[str, AfterValidator(_extra_arg)]
"""One item of `SlurmSpec.extra_args`, checked on its own (errors name `extra_args[i]`)."""


class SlurmSpec(BaseModel):
    """How the job asks Slurm for its allocation (the ``slurm:`` section).

    Used by `trainctl launch --scheduler slurm`, whose flags (`--partition`, `--gpus-per-node`,
    ...) override it; the result is stored with the job, so requeues and `trainctl resume` see
    the same request. The local scheduler ignores the section: one recipe runs both ways.
    Each value is checked as sbatch would read it (`trainctl.launch.slurm_request`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    partition: str | None = None
    """`--partition`: one partition or a comma-separated list (default: the cluster's)."""
    time_limit: str | None = None
    """`--time`: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` or `UNLIMITED`
    (default: the partition's)."""
    gpus_per_node: int = 0
    """GPUs to ask for on every node (0: none)."""
    gpu_type: str | None = None
    """The GPU type as the cluster names it in its GRES (`h100`); default: any type."""
    gpu_request: GpuRequest = "gpus-per-node"
    """How GPUs are asked for: `gpus-per-node` (`--gpus-per-node=[type:]N`, the default) or
    `gres` (`--gres=gpu[:type]:N`, for sites that count GPUs as GRES only)."""
    account: str | None = None
    """`--account` to charge (default: the user's default account)."""
    qos: str | None = None
    """`--qos` (default: the account's default QOS)."""
    constraint: str | None = None
    """`--constraint`: node features, combined with `&` and `|` (`h100&ib`)."""
    reservation: str | None = None
    """`--reservation`: one reservation or a comma-separated list."""
    exclusive: bool = False
    """`--exclusive`: no other job shares the nodes."""
    mem: str | None = None
    """`--mem` per node in sbatch's syntax (`500G`, `512000`; `0`: all of the node's
    memory); default: the partition's default."""
    cpus_per_task: int | None = None
    """`--cpus-per-task` for the one task per node (the node agent and its workers); default:
    Slurm's (1)."""
    signal_grace_s: int = DEFAULT_SIGNAL_GRACE_S
    """Slurm sends USR1 to the batch process this long before the time limit
    (`--signal=B:USR1@N`, 1..65535 s; default 120): the time to commit a checkpoint and
    requeue. Slurm may send it up to 60 s earlier than asked."""
    drain_blamed_nodes: bool = False
    """Also drain a node the job blamed (`scontrol update State=DRAIN`), so no job lands on
    it, when the job requeues itself without it. Needs Slurm operator rights. (Was
    `recovery.drain_blamed_nodes`, still accepted.)"""
    extra_args: tuple[ExtraArg, ...] = ()
    """More sbatch options, one long option per item (`--comment=two words`, `--hold`),
    written as `#SBATCH` lines after the others. Options trainctl sets itself, or that a field
    above covers, are refused."""

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: str | None) -> str | None:
        return None if value is None else slurm_request.check_partition(value)

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: str | None) -> str | None:
        return None if value is None else slurm_request.check_time_limit(value)

    @field_validator("gpus_per_node")
    @classmethod
    def _gpus(cls, value: int) -> int:
        return slurm_request.check_count(value, "gpus_per_node", 0)

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, value: str | None, info: ValidationInfo) -> str | None:
        return slurm_request.check_gpu_type(value, info.data.get("gpus_per_node", 0))

    @field_validator("account", "qos", "reservation")
    @classmethod
    def _names(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        what = {"account": "account", "qos": "QOS", "reservation": "reservation"}
        field = info.field_name or ""
        return slurm_request.check_name(value, what[field], lists=field == "reservation")

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        return None if value is None else slurm_request.check_constraint(value)

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> Any:
        # YAML reads `mem: 0` or `mem: 512000` as a number: sbatch reads it as megabytes.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return value if not isinstance(value, str) else slurm_request.check_mem(value)

    @field_validator("cpus_per_task")
    @classmethod
    def _cpus(cls, value: int | None) -> int | None:
        return None if value is None else slurm_request.check_count(value, "cpus_per_task", 1)

    @field_validator("signal_grace_s")
    @classmethod
    def _grace(cls, value: int) -> int:
        return slurm_request.check_signal_grace(value)
