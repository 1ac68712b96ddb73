"""JobSpec: what to run, validated once at the edge and frozen.

A recipe is a YAML file (``recipes/tiny-gpt.yaml``); a plain script launch builds the same
`JobSpec` from flags. Every validation problem becomes a `UserError` naming the file, the field
path, the bad value and the fix, so nothing starts on bad input.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainctl.errors import UserError

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Job ids become path segments and Slurm job names: no `/`, no `..`, at most 64 characters."""

URL_SCHEMES = ("file", "s3")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class CheckpointSpec(_Frozen):
    """The recipe's ``checkpoint:`` section."""

    interval_steps: int = Field(default=0, ge=0)
    """Save every N steps (0: no periodic checkpoints)."""
    keep_last: int = Field(default=2, ge=2)
    """Keep the newest N committed steps (at least 2: the newest may still be uploading)."""
    keep_every: int = Field(default=0, ge=0)
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

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_storage_url(value)
        return value


class LaunchSpec(_Frozen):
    """How torchrun is driven (the ``launch:`` section)."""

    max_restarts: int = Field(default=10, ge=0)
    """Relaunches inside the allocation, all causes together (0: the first failure ends the
    job with exit 1 for the scheduler to requeue). torchrun itself never restarts: trainctl
    decides every restart, so it can blame, exclude and restore first."""
    monitor_interval_s: float = Field(default=0.1, gt=0)
    """How often torchrun's agent checks its workers."""
    join_timeout_s: float = Field(default=120.0, gt=0)
    """How long the rendezvous waits for every node to join."""
    stop_grace_s: float = Field(default=5.0, gt=0, le=60)
    """After SIGTERM, how long workers get before SIGKILL."""
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
    drain_blamed_nodes: bool = False
    """Slurm: also drain a blamed node (needs operator rights)."""

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


FAULT_KINDS = ("kill-node", "kill-worker", "hang", "nvml-xid", "storage-outage")
"""Faults `trainctl launch --fault` can inject (local scheduler, a testing feature)."""


class FaultSpec(_Frozen):
    """One injected fault: `KIND[:NODE]@step=N[,for=SECONDS]`."""

    kind: str
    node: str | None = None
    step: int = Field(ge=1)
    duration_s: float = Field(default=10.0, gt=0)
    """storage-outage: how long storage refuses every request."""

    def describe(self) -> str:
        where = f":{self.node}" if self.node else ""
        extra = f",for={self.duration_s:g}" if self.kind == "storage-outage" else ""
        return f"{self.kind}{where}@step={self.step}{extra}"


def parse_fault(text: str, where: str = "--fault") -> FaultSpec:
    """Parse `KIND[:NODE]@step=N[,for=S]`, e.g. ``kill-node:node-1@step=7``."""
    match = re.fullmatch(
        r"(?P<kind>[a-z-]+)(?::(?P<node>node-[0-9]+))?@step=(?P<step>[0-9]+)"
        r"(?:,for=(?P<for>[0-9.]+)s?)?",
        text.strip(),
    )
    fix = (
        "write KIND[:NODE]@step=N, e.g. kill-node:node-1@step=7 or storage-outage@step=5,for=10; "
        f"kinds: {', '.join(FAULT_KINDS)}"
    )
    if match is None:
        raise UserError("cannot parse the fault", where=where, value=text, fix=fix)
    kind = match["kind"]
    if kind not in FAULT_KINDS:
        raise UserError("unknown fault kind", where=where, value=text, fix=fix)
    node = match["node"]
    if kind != "storage-outage" and node is None:
        raise UserError(
            f"a {kind} fault needs a node", where=where, value=text, fix=f"write {kind}:node-1@..."
        )
    if int(match["step"]) < 1:
        raise UserError("the step must be >= 1", where=where, value=text, fix=fix)
    return FaultSpec(
        kind=kind,
        node=node,
        step=int(match["step"]),
        duration_s=float(match["for"]) if match["for"] else 10.0,
    )


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
    hang_window: int = Field(default=100, ge=1)
    """How many recent step times (all ranks together) the p99 is taken over."""
    checkpoint_allowance_s: float = Field(default=300.0, ge=0)
    """Added to the hang timeout while a rank's checkpoint save is in progress (a save may wait
    for the previous upload: back-pressure)."""
    first_step_allowance_s: float = Field(default=600.0, gt=0)
    """Hang timeout before a rank's first reported step."""
    straggler_factor: float = Field(default=1.2, gt=1)
    """A node is a straggler when its step (busy) time exceeds this multiple of the others'."""
    straggler_window: int = Field(default=20, ge=2)
    """How many recent steps the straggler judgement looks at."""
    stack_dump_timeout_s: float = Field(default=15.0, gt=0)
    """After a hang, how long the controller waits for every node's stack dumps."""


class JobSpec(_Frozen):
    """A validated job: recipe file plus command-line overrides."""

    name: str
    """Human name of the job (recipe file stem by default)."""
    script: str
    """Training script (absolute path once loaded)."""
    args: tuple[str, ...] = ()
    """Arguments passed to the script."""
    nodes: int = Field(default=1, ge=1, le=1024)
    """Number of nodes (simulated nodes with the local scheduler)."""
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    """Worker processes per node."""
    min_nodes: int | None = Field(default=None, ge=1)
    """Fewest nodes the job may shrink to after excluding bad ones (default: `nodes`)."""
    spare_nodes: int = Field(default=0, ge=0, le=64)
    """Standby nodes that replace a failed one."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many steps (passed to the script as TRAINCTL_MAX_STEPS)."""
    seed: int = 0
    """Seed of the deterministic data and initialisation."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for the workers."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Free-form settings for the training script (model size, learning rate...)."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    faults: tuple[FaultSpec, ...] = ()
    """Faults to inject (``trainctl launch --fault``; local scheduler only, for tests and demos)."""
    node_env: dict[str, dict[str, str]] = Field(default_factory=dict)
    """Extra environment for one node's agent, torchrun and workers, by node name
    (``node-1: {FAKE_NVML_FILE: /tmp/xid79.nvml}``); applied after `env`. With the local
    scheduler this is how a test gives each simulated node its own fake NVML fault file;
    `--dry-run` shows the result in each node's environment."""
    uses_runtime: bool = True
    """Whether the script uses trainctl.runtime (recipes do; plain scripts may not)."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

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
            raise ValueError(f"min_nodes ({self.min_nodes}) cannot exceed nodes ({self.nodes})")
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
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def fewest_nodes(self) -> int:
        """The smallest number of nodes the job may run on (`min_nodes`, default `nodes`)."""
        return self.min_nodes if self.min_nodes is not None else self.nodes


def check_job_id(job_id: str, where: str = "--job-id") -> str:
    """Return `job_id` if it is a safe path segment, else raise a UserError."""
    if not JOB_ID_PATTERN.fullmatch(job_id) or ".." in job_id:
        raise UserError(
            "invalid job id",
            where=where,
            value=job_id,
            fix="use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )
    return job_id


def check_storage_url(url: str, where: str = "storage") -> str:
    """Accept a plain path, file:// or s3://bucket[/prefix]; raise a UserError otherwise."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme not in URL_SCHEMES:
            raise UserError(
                f"unsupported storage scheme {scheme!r}",
                where=where,
                value=url,
                fix="use a local path, file:///abs/path or s3://bucket/prefix",
            )
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise UserError(
                "s3 URL has no bucket",
                where=where,
                value=url,
                fix="use s3://bucket/prefix",
            )
        if scheme == "file" and not rest.startswith("/"):
            raise UserError(
                "file URL must be absolute",
                where=where,
                value=url,
                fix="use file:///abs/path or a plain path",
            )
    elif not url.strip():
        raise UserError("empty storage path", where=where, value=url, fix="give a path or URL")
    return url


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def _fix_for(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "remove the field or check its spelling (see the recipe reference in README.md)"
    if kind == "missing":
        return "add the field"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"use a value of the right type: {error.get('msg', '')}"
    return str(error.get("msg", "fix the value"))


def validation_to_user_error(error: ValidationError, source: str) -> UserError:
    """Turn pydantic's first error into one message naming file, field, value and fix."""
    first = error.errors()[0]
    field = _field_path(tuple(first.get("loc", ())))
    has_value = first.get("type") != "missing"
    return UserError(
        first.get("msg", "invalid value")
        if first.get("type") != "extra_forbidden"
        else "unknown field",
        where=f"{source}: {field}",
        value=first.get("input") if has_value else None,
        has_value=has_value,
        fix=_fix_for(first),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(
            "recipe file not found", where=str(path), fix="check the path to the recipe"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read recipe: {exc.strerror}", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(
            f"malformed YAML: {problem}", where=where, fix="fix the YAML syntax at that line"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            "a recipe must be a YAML mapping",
            where=str(path),
            value=type(data).__name__,
            fix="write `key: value` fields at the top level",
        )
    return data


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load and validate a recipe, applying command-line overrides (None values are ignored).

    The script path is resolved relative to the recipe's directory and must exist.
    Raises UserError on any problem; never starts anything.
    """
    recipe = Path(path)
    data = _read_yaml(recipe)
    data.setdefault("name", recipe.stem)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    source = str(path)
    script = data.get("script")
    if isinstance(script, str):
        script_path = Path(script)
        if not script_path.is_absolute():
            script_path = (recipe.parent / script_path).resolve()
        if not script_path.is_file():
            raise UserError(
                "training script not found",
                where=f"{source}: script",
                value=script,
                fix=f"create {script_path} or fix the path (relative to the recipe's directory)",
            )
        data["script"] = str(script_path)
    if "args" in data and isinstance(data["args"], list):
        data["args"] = tuple(str(arg) for arg in data["args"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, source) from None


def script_spec(
    script: str,
    args: list[str],
    overrides: dict[str, Any] | None = None,
) -> JobSpec:
    """Build a JobSpec for an unmodified torchrun script (no recipe, no trainctl imports)."""
    script_path = Path(script)
    if not script_path.is_file():
        raise UserError(
            "training script not found", where="SCRIPT", value=script, fix="check the path"
        )
    data: dict[str, Any] = {
        "name": script_path.stem,
        "script": str(script_path.resolve()),
        "args": tuple(args),
        "uses_runtime": False,
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, "command line") from None


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec as YAML, as stored in the job store (reloadable by `spec_from_yaml`)."""
    data = spec.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def spec_from_yaml(text: str, source: str) -> JobSpec:
    """Reload a stored spec."""
    data = yaml.safe_load(text)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, source) from None
