"""JobSpec: what to run, validated once at the edge and frozen.

A recipe is a YAML file (``recipes/tiny-gpt.yaml``) loaded by `trainctl.recipe`; a plain
script launch builds the same `JobSpec` from flags. Every section is a frozen model with a
docstring under each field, and each field's default is stated here only: the worker runtime
receives the validated sections, not loose values.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainctl.launch.slurm_request import SlurmValueError
from trainctl.secrets import (
    REDACTED,
    JobSecrets,
    is_secret_name,
    merge_options,
    redact,
    split_options,
    without_redacted,
)
from trainctl.spec_names import check_job_id, check_storage_url
from trainctl.spec_slurm import SlurmSpec

# The ``slurm:`` section and the job-id/storage-URL checks live in their own modules.
__all__ = ["SlurmSpec", "check_job_id", "check_storage_url"]

MAX_SEED = 2**32 - 1
"""The largest seed: every seeding API a training script may hand it to takes it (numpy's
legacy seed stops here; torch.manual_seed stops at 64 bits, and recipes derive per-step seeds
from it by multiplication)."""
MAX_STEPS = 10**9
"""The largest step count a recipe may ask for (or count in): a billion steps."""


class _Frozen(BaseModel):
    # inf and nan are no one's timeout or threshold: time.sleep(inf) raises in every worker.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class MemoryTierSpec(_Frozen):
    """The ``checkpoint.memory:`` section: a checkpoint tier in host shared memory (tmpfs),
    outside the worker processes, restored before durable storage (`trainctl.checkpoint.memory`)."""

    enabled: bool = False
    """Keep in-memory checkpoints. Off by default: every memory save costs each rank one copy
    of its state per interval into a fixed slot, and each node holds `slots` x (1 + replicas) x
    its ranks' state in host memory (README: checkpoint tiers)."""
    interval_steps: int = Field(default=1, ge=1, le=MAX_STEPS)
    """Save into memory every N steps (1: every step, nothing replayed after a worker crash)."""
    replicas: int = Field(default=1, ge=0, le=8)
    """Peer nodes that hold a copy of each node's memory steps (over TCP, on other hosts when
    there are), so a lost node's step is restored from a peer's RAM. 0: a node loss restores
    from durable storage. Each replica adds `slots` copies of a node's state (two:
    double-buffered) to some other node's RAM."""
    slots: int = Field(default=2, ge=1, le=2)
    """Slots per copy (the rank's own and each replica): 2 (default) double-buffers every copy,
    so the newest whole copy survives the write of the next; 1 halves the memory (at most
    (1 + replicas) x the state) and, with replicas, skips a memory save while the step the slot
    holds is not yet replicated, so a rank's own slot and its replica are never both torn
    (README: checkpoint tiers says which failures then restore from a replica or storage)."""


class CheckpointSpec(_Frozen):
    """The recipe's ``checkpoint:`` section."""

    interval_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    """Save every N steps (0: no periodic checkpoints)."""
    keep_last: int = Field(default=2, ge=2, le=100_000)
    """Keep the newest N committed steps (at least 2: the newest may still be uploading)."""
    keep_every: int = Field(default=0, ge=0, le=MAX_STEPS)
    """Also keep every step that is a multiple of this (0: none)."""
    storage: str | None = None
    """Where checkpoints go (path, file:// or s3://); default `<root>/checkpoints/<job id>`."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec/s3fs (endpoint_url, ...). Credentials belong in the environment."""
    part_size_mb: int = Field(default=64, ge=5, le=5120)
    """Multipart part size for object storage uploads."""
    concurrency: int = Field(default=8, ge=1, le=256)
    """Concurrent part uploads / ranged reads per rank."""
    direct_io: bool = True
    """Local checkpoint files: write through O_DIRECT where the file system takes it (false:
    through the page cache, then fsync)."""
    memory: MemoryTierSpec = Field(default_factory=MemoryTierSpec)
    """The in-memory tier beside the durable one (``checkpoint.memory``)."""

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_storage_url(value)
        return value


class LaunchSpec(_Frozen):
    """How torchrun is driven (the ``launch:`` section)."""

    max_restarts: int = Field(default=10, ge=0, le=100_000)
    """Relaunches inside the allocation, all causes together (0: the first failure ends the
    job with exit 1 for the scheduler to requeue). torchrun itself never restarts: trainctl
    decides every restart, so it can blame, exclude and restore first."""
    monitor_interval_s: float = Field(default=0.1, gt=0)
    """How often torchrun's agent checks its workers."""
    join_timeout_s: float = Field(default=120.0, gt=0)
    """How long the rendezvous waits for every node to join."""
    stop_grace_s: float = Field(default=5.0, gt=0, le=60)
    """After SIGTERM, how long workers get before SIGKILL."""
    rdzv_port: int = Field(default=0, ge=0, le=65535)
    """The port the controller's rendezvous store listens on (0: one the OS chooses when the
    job starts; `launch --rdzv-port` sets it)."""
    lease_ttl_s: float = Field(default=30.0, gt=0)
    """How long the job's controller lease lasts unrenewed: a controller on another host may
    take the job over after it saw no renewal for this long (`trainctl.lease`)."""
    warm_workers: bool = True
    """Start workers from a per-node process that imported torch ahead of time
    (`trainctl.launch.zygote`): relaunches skip ~1.7 s of imports per worker. Recipes only
    (``uses_runtime``); false: every worker is a fresh interpreter."""


FAILURE_CAUSES = (
    "node_fault",
    "worker_crash",
    "software_error",
    "hang",
    "storage",
)
"""How the policy classifies a failed attempt (see `trainctl.recovery.policy.classify`)."""


class RecoverySpec(_Frozen):
    """What happens after a failure (the ``recovery:`` section)."""

    crash_loop_limit: int = Field(default=3, ge=1)
    """Give up (exit 3) when the same failure signature repeats this many times in a row with
    no new committed checkpoint in between."""
    repeat_offender_crashes: int = Field(default=2, ge=1)
    """A node whose workers die of a signal (SIGKILL, SIGSEGV, the OOM killer) this many times
    within `repeat_offender_window_s`, each time the only node to crash, is blamed and
    excluded."""
    repeat_offender_window_s: float = Field(default=3600.0, gt=0)
    restarts_per_cause: dict[str, int] = Field(
        default_factory=lambda: {
            "node_fault": 8,
            "worker_crash": 5,
            "software_error": 3,
            "hang": 3,
            "storage": 5,
        }
    )
    """Retry budget per failure cause (a cause left out keeps its default); `launch.max_restarts`
    caps the total."""
    exclude_s: float = Field(default=3600.0, gt=0)
    """How long a blamed node stays on the blocklist; after that a clean health probe lets it
    back."""

    @field_validator("restarts_per_cause")
    @classmethod
    def _causes(cls, value: dict[str, int]) -> dict[str, int]:
        defaults = cls.model_fields["restarts_per_cause"].get_default(call_default_factory=True)
        for cause, budget in value.items():
            if cause not in FAILURE_CAUSES:
                raise ValueError(
                    f"unknown failure cause {cause!r}: use one of {', '.join(FAILURE_CAUSES)}"
                )
            if budget < 0:
                raise ValueError(f"restarts_per_cause.{cause} must be >= 0")
        return {**defaults, **value}

    def budget(self, cause: str) -> int:
        return self.restarts_per_cause.get(cause, 3)


FAULT_KINDS = (
    "kill-node",
    "freeze-node",
    "partition-node",
    "kill-worker",
    "hang",
    "nvml-xid",
    "storage-outage",
    "corrupt-memory",
)
"""Faults `trainctl launch --fault` can inject (local scheduler, a testing feature)."""


class FaultSpec(_Frozen):
    """One injected fault: `KIND[:NODE]@step=N[,for=SECONDS]`."""

    kind: str
    node: str | None = None
    step: int = Field(ge=0)
    """Fires when the job first reports this step; 0: as soon as a torchrun of the job started
    (the workers are still importing and joining: a failure while starting)."""
    duration_s: float = Field(default=10.0, gt=0)
    """storage-outage: how long storage refuses every request."""

    def describe(self) -> str:
        where = f":{self.node}" if self.node else ""
        extra = f",for={self.duration_s:g}" if self.kind == "storage-outage" else ""
        return f"{self.kind}{where}@step={self.step}{extra}"


class HealthSpec(_Frozen):
    """Node health and progress watching (the ``health:`` section).

    The hang timeout between steps is derived from observed step times as
    max(`hang_floor_s`, `hang_k` x p99 of the last `hang_window` step times) unless
    `hang_timeout_s` pins it; before a rank's first step `first_step_allowance_s` applies
    instead (the first step also imports, joins the process group and builds the model).
    """

    probe_interval_s: float = Field(default=30.0, ge=0)
    """How often each node agent re-probes GPUs and host while running (0: only before start)."""
    min_free_disk_gb: float = Field(default=1.0, ge=0)
    """Free space required at the run directory, the store and the checkpoint root (GiB)."""
    require_nvml: bool = False
    """True on GPU clusters: a missing NVML library is then UNHEALTHY instead of fail-open."""
    hang_timeout_s: float | None = Field(default=None, gt=0)
    """Pin the hang timeout between steps (seconds); default: derived from step times."""
    hang_floor_s: float = Field(default=60.0, gt=0)
    """The derived hang timeout is never shorter than this."""
    hang_k: float = Field(default=5.0, gt=0)
    """The derived hang timeout is at least this multiple of the p99 step time."""
    hang_window: int = Field(default=100, ge=1, le=100_000)
    """How many recent step times (all ranks together) the p99 is taken over."""
    checkpoint_allowance_s: float = Field(default=300.0, ge=0)
    """Added to the hang timeout while a rank's checkpoint save is in progress (a save may wait
    for the previous upload: back-pressure)."""
    first_step_allowance_s: float = Field(default=600.0, gt=0)
    """Hang timeout before a rank's first reported step."""
    straggler_factor: float = Field(default=1.2, gt=1)
    """A node is a straggler when its step (busy) time exceeds this multiple of the others'."""
    straggler_window: int = Field(default=20, ge=2, le=100_000)
    """How many recent steps the straggler judgement looks at."""
    stack_dump_timeout_s: float = Field(default=15.0, gt=0)
    """After a hang, how long the controller waits for every node's stack dumps."""
    heartbeat_interval_s: float = Field(default=0.25, gt=0, le=10)
    """How often controller and node agents send each other a heartbeat (lengthened to
    nodes / 1,024 s for large jobs; an agent's other messages count as beats)."""
    phi_threshold: float = Field(default=8.0, gt=0)
    """A peer whose heartbeats stop is suspected once the φ-accrual detector reaches this
    (`trainctl.health.liveness`; 8: about one wrong suspicion in 10^8 judgements)."""
    heartbeat_pause_s: float = Field(default=1.0, ge=0)
    """A pause in an agent's heartbeats the controller accepts before φ starts to climb: with
    the defaults a silent node is declared lost after about 1.8 s."""
    controller_pause_s: float = Field(default=5.0, ge=0)
    """The same for agents judging the controller (an agent that loses its controller tears
    its node down)."""
    gpu_idle_util_pct: float = Field(default=10.0, ge=0, le=100)
    """A node whose GPUs' mean utilisation stays below this (percent) over
    `gpu_idle_window_s`, while the median of the job's other nodes is at or above it, is
    flagged idle (a ``gpu_idle`` event and a line in `trainctl status`; a warning, never an
    exclusion). 0 turns the flag off."""
    gpu_idle_window_s: float = Field(default=300.0, gt=0)
    """How many seconds of the latest GPU samples (taken while training ran) the idle-GPU
    judgement and `trainctl status` look at."""


MAX_NODES = 4096
"""The most nodes a job may have: what the control plane was shown to run with a failure decided
and a relaunch (`benchmarks/scale.py`, BENCHMARKS.md "Scale", run 4)."""


class JobSpec(_Frozen):
    """A validated job: recipe file plus command-line overrides."""

    name: str
    """Human name of the job (recipe file stem by default)."""
    script: str
    """Training script (absolute path once loaded)."""
    args: tuple[str, ...] = ()
    """Arguments passed to the script."""
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    """Number of nodes (simulated nodes with the local scheduler)."""
    nproc_per_node: int | Literal["gpu", "auto"] = 1
    """Worker processes per node: a number, ``gpu`` (one per GPU the node's agent sees:
    NVML's devices, narrowed by ``CUDA_VISIBLE_DEVICES`` where the scheduler set it; a node
    without one fails its attempt) or ``auto`` (one per GPU, or 1 on a node without GPUs; unlike
    torchrun's ``auto``, never one per CPU core). Each worker binds ``cuda:LOCAL_RANK``."""
    min_nodes: int | None = Field(default=None, ge=1)
    """Fewest nodes the job may shrink to after excluding bad ones (default: `nodes`)."""
    spare_nodes: int = Field(default=0, ge=0, le=64)
    """Standby nodes that replace a failed one."""
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Stop after this many steps (passed to the script as TRAINCTL_MAX_STEPS)."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of the deterministic data and initialisation (0 to 2**32 - 1)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for the workers. Entries whose names say they hold a
    credential (``WANDB_API_KEY``, ``HF_TOKEN``: `trainctl.secrets.is_secret_name`) are moved to
    `secrets`."""
    secrets: dict[str, str] = Field(default_factory=dict)
    """Environment variables for the workers whose values are secret: never stored in the job
    store, printed, or passed through trainctl's own processes (`trainctl.secrets`)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Free-form settings for the training script (model size, learning rate...)."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    faults: tuple[FaultSpec, ...] = ()
    """Faults to inject (``trainctl launch --fault``; local scheduler only, for tests and demos)."""
    node_env: dict[str, dict[str, str]] = Field(default_factory=dict)
    """Extra environment for one node's agent, torchrun and workers, by node name
    (``node-1: {FAKE_NVML_FILE: /tmp/xid79.nvml}``); applied after `env`. With the local
    scheduler this is how a test gives each simulated node its own fake NVML fault file;
    `--dry-run` shows the result in each node's environment."""
    uses_runtime: bool = True
    """Whether the script uses trainctl.runtime (recipes do; plain scripts may not)."""
    source: str | None = None
    """The recipe file (absolute), where `trainctl resume` finds the secret values again."""

    @model_validator(mode="before")
    @classmethod
    def _moved_drain(cls, data: Any) -> Any:
        """`recovery.drain_blamed_nodes` (releases before the ``slurm:`` section, and the
        specs they stored) means `slurm.drain_blamed_nodes`."""
        if not isinstance(data, dict) or not isinstance(data.get("recovery"), dict):
            return data
        recovery = dict(data["recovery"])
        if "drain_blamed_nodes" not in recovery:
            return data
        old = recovery.pop("drain_blamed_nodes")
        slurm = data.get("slurm")
        slurm = dict(slurm) if isinstance(slurm, dict) else {} if slurm is None else slurm
        if isinstance(slurm, dict):
            if "drain_blamed_nodes" in slurm and slurm["drain_blamed_nodes"] != old:
                raise ValueError(
                    "recovery.drain_blamed_nodes (the old name) and slurm.drain_blamed_nodes "
                    "disagree: keep slurm.drain_blamed_nodes only"
                )
            slurm.setdefault("drain_blamed_nodes", old)
        return {**data, "recovery": recovery, "slurm": slurm}

    @model_validator(mode="before")
    @classmethod
    def _secret_env(cls, data: Any) -> Any:
        """Move credential-named ``env:`` entries to ``secrets:``."""
        if isinstance(data, dict) and isinstance(data.get("env"), dict):
            env = data["env"]
            moved = {k: v for k, v in env.items() if isinstance(k, str) and is_secret_name(k)}
            if moved:
                given = data.get("secrets")
                secrets: dict[str, Any] = given if isinstance(given, dict) else {}
                data = {
                    **data,
                    "env": {k: v for k, v in env.items() if k not in moved},
                    "secrets": {**moved, **secrets},
                }
        return data

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _nproc(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value in ("gpu", "auto"):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
            return value
        raise ValueError("use a number of workers from 1 to 64, gpu or auto")

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: dict[str, str]) -> dict[str, str]:
        return cls._env_names(value)

    @field_validator("node_env")
    @classmethod
    def _node_env_names(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for node, env in value.items():
            if not re.fullmatch(r"node-[0-9]+", node):
                raise ValueError(f"invalid node name {node!r}: nodes are named node-0, node-1, ...")
            cls._env_names(env)
        return value

    @model_validator(mode="after")
    def _node_counts(self) -> JobSpec:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise SlurmValueError(  # a problem and its fix, reported in trainctl's words
                f"min_nodes ({self.min_nodes}) cannot exceed nodes ({self.nodes})",
                fix="lower min_nodes, or raise nodes (--nodes) to at least min_nodes",
            )
        num_nodes = self.nodes + self.spare_nodes
        for fault in self.faults:
            if fault.node is not None and int(fault.node.split("-", 1)[1]) >= num_nodes:
                raise ValueError(
                    f"fault {fault.describe()} names {fault.node}, but the job has only "
                    f"node-0..node-{num_nodes - 1}"
                )
        for node in self.node_env:
            if int(node.split("-", 1)[1]) >= num_nodes:
                raise ValueError(
                    f"node_env names {node}, but the job has only node-0..node-{num_nodes - 1}"
                )
        return self

    @property
    def per_gpu(self) -> bool:
        """Whether each node's worker count is its GPU count (``gpu``/``auto``), known only
        once the node's agent has probed its GPUs."""
        return isinstance(self.nproc_per_node, str)

    @property
    def world_size(self) -> int:
        """The number of workers, 0 while it depends on the nodes' GPUs (`per_gpu`)."""
        if isinstance(self.nproc_per_node, str):
            return 0
        return self.nodes * self.nproc_per_node

    def job_secrets(self) -> JobSecrets:
        """The secret values: `secrets` and the credentials in the checkpoint storage options."""
        _, credentials = split_options(self.checkpoint.storage_options)
        return JobSecrets(env=dict(self.secrets), storage_options=credentials)

    def redacted(self) -> JobSpec:
        """This spec with every secret value replaced by ``***`` (what is stored and shown)."""
        options = redact(self.checkpoint.storage_options)
        return self.model_copy(
            update={
                "secrets": dict.fromkeys(self.secrets, REDACTED),
                "checkpoint": self.checkpoint.model_copy(update={"storage_options": options}),
            }
        )

    def with_secrets(self, secrets: JobSecrets) -> JobSpec:
        """This spec with the secret values put back (a stored spec, `redacted`, on resume)."""
        public, _ = split_options(without_redacted(self.checkpoint.storage_options))
        options = merge_options(public, secrets.storage_options)
        kept = {k: v for k, v in secrets.env.items() if k in self.secrets}
        return self.model_copy(
            update={
                "secrets": kept,
                "checkpoint": self.checkpoint.model_copy(update={"storage_options": options}),
            }
        )

    @property
    def fewest_nodes(self) -> int:
        """The smallest number of nodes the job may run on (`min_nodes`, default `nodes`)."""
        return self.min_nodes if self.min_nodes is not None else self.nodes
