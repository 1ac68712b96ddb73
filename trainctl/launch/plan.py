"""Pure planning: a JobSpec plus facts gathered at the edge -> the exact commands to run.

`plan_attempt` builds a `LaunchPlan` for one attempt: per node, the torchrun argv and the
environment the node agent adds for it. Nothing here touches processes, sockets or the clock;
`render_plan` prints the plan for ``--dry-run`` (golden-tested).
"""

from __future__ import annotations

import dataclasses
import json
import shlex

from pydantic import TypeAdapter, ValidationError

from trainctl.checkpoint.layout import MEMORY_BASE
from trainctl.errors import first_problem
from trainctl.protocol import Env, GatePlan
from trainctl.secrets import REDACTED, split_options
from trainctl.spec import JobSpec

RDZV_PORT_PLACEHOLDER = 0
"""A rendezvous port of 0 means 'chosen when the job starts' (the controller binds port 0)."""


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the edge gathered once and passes in as data (no hidden look-ups in the planner)."""

    python: str
    """The Python interpreter the node agents and torchrun run with."""
    storage_root: str
    """The job store root (path or URL)."""
    run_dir: str
    """Local directory for logs and torchrun error files."""
    rdzv_host: str = "127.0.0.1"
    rdzv_port: int = RDZV_PORT_PLACEHOLDER
    control_endpoint: str = ""
    """host:port of the controller's control channel ('' in a dry run)."""
    checkpoint_root: str = ""
    secrets_file: str = ""
    """The job's 0600 secrets file ('' when the job has no secrets)."""
    node_addr: str = ""
    """The address every node of the job is reached at (the local scheduler's simulated
    nodes: 127.0.0.1); '' lets each node's torchrun look its own host name up."""


@dataclasses.dataclass(frozen=True)
class NodePlan:
    """What runs on one node: the agent runs `argv` with `env` added to its own environment."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    log_path: str
    error_dir: str

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    job_id: str
    attempt: int
    world_size: int
    """0 while it depends on the nodes' GPUs (``nproc_per_node: gpu``): each agent reports
    its worker count when its torchrun starts."""
    rdzv_endpoint: str
    nodes: tuple[NodePlan, ...]
    excluded: tuple[str, ...] = ()
    spares: tuple[str, ...] = ()
    gate: GatePlan = dataclasses.field(default_factory=lambda: GatePlan(paths=()))
    secrets: tuple[str, ...] = ()
    """Names of the secret variables the workers get (their values are never in a plan)."""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> LaunchPlan:
        """Decode a plan file; raises ValueError naming the field that does not fit."""
        try:
            return _PLAN.validate_python(data)
        except ValidationError as bad:
            raise ValueError(first_problem(bad)) from None


_PLAN: TypeAdapter[LaunchPlan] = TypeAdapter(LaunchPlan)


def node_names(count: int, prefix: str = "node") -> tuple[str, ...]:
    return tuple(f"{prefix}-{i}" for i in range(count))


def rdzv_conf(spec: JobSpec) -> str:
    """Rendezvous settings: the controller hosts the store, so no agent is the host.

    The keep-alive and last-call values are the tuned ones measured on this project's machine
    (node-loss recovery 47 s with torchrun's defaults, 5.5 s tuned).
    """
    return ",".join(
        [
            "is_host=false",
            f"join_timeout={int(spec.launch.join_timeout_s)}",
            "last_call_timeout=1",
            "keep_alive_interval=1",
            "keep_alive_max_attempt=3",
            "close_timeout=5",
        ]
    )


def torchrun_argv(
    spec: JobSpec, facts: Facts, job_id: str, attempt: int, num_nodes: int, error_dir: str
) -> tuple[str, ...]:
    """torchrun's command line for one node of an attempt (torchrun is called, never forked)."""
    port = str(facts.rdzv_port) if facts.rdzv_port else "<rdzv-port>"
    return (
        facts.python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={num_nodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={facts.rdzv_host}:{port}",
        f"--rdzv-id={job_id}-a{attempt}",
        f"--rdzv-conf={rdzv_conf(spec)}",
        *((f"--local-addr={facts.node_addr}",) if facts.node_addr else ()),
        # trainctl decides every restart (blame, exclusion, restore first): torchrun never does.
        "--max-restarts=0",
        f"--monitor-interval={spec.launch.monitor_interval_s:g}",
        f"--log-dir={error_dir}",
        # Each rank's stderr also into the log dir: a plain script's traceback is found there.
        "--tee=2",
        *(("-m", "trainctl.launch.shim") if uses_shim(spec) else ()),
        spec.script,
        *spec.args,
    )


def warm_workers(spec: JobSpec) -> bool:
    """Whether workers are forked from the node's zygote (recipes using trainctl.runtime)."""
    return spec.launch.warm_workers and spec.uses_runtime


def uses_shim(spec: JobSpec) -> bool:
    """Whether torchrun starts workers through `trainctl.launch.shim`: to hand them to the
    zygote, or to give them the job's secret variables (which torchrun never holds)."""
    return warm_workers(spec) or bool(spec.secrets)


def node_env(spec: JobSpec, facts: Facts, job_id: str, attempt: int, node: str) -> dict[str, str]:
    """The variables a node's agent adds for torchrun and the workers (sorted, deterministic)."""
    env: dict[str, str] = {
        Env.JOB_ID: job_id,
        Env.NODE: node,
        Env.ATTEMPT: str(attempt),
        Env.STORAGE: facts.storage_root,
        Env.SEED: str(spec.seed),
        # The agent's SIGTERM -> SIGKILL grace when stopping its tree (the recipe's setting).
        Env.STOP_GRACE_S: f"{spec.launch.stop_grace_s:g}",
        Env.CONFIG: json.dumps(spec.config, sort_keys=True, separators=(",", ":")),
        # One intra-op thread per worker: the simulated nodes share the host's cores.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if spec.uses_runtime:
        # A fresh bootstrap store per rendezvous round, hosted by the round's rank 0 (the
        # runtime joins through it): torchrun's shared store outlives rounds, so a restarted
        # worker could read a dead peer's address, and agents may disagree on the restart
        # count, so a count-keyed prefix cannot fix it. Unmodified scripts keep torchrun's
        # stock behaviour (their rank 0 would otherwise host a store it may tear down early).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if spec.max_steps is not None:
        env[Env.MAX_STEPS] = str(spec.max_steps)
    if facts.checkpoint_root:
        env[Env.CHECKPOINT_ROOT] = facts.checkpoint_root
    if facts.secrets_file:
        env[Env.SECRETS_FILE] = facts.secrets_file
    # The validated section, credentials left out (they reach workers through the secrets
    # file or the standard AWS chain).
    public, _ = split_options(spec.checkpoint.storage_options)
    ckpt = spec.checkpoint.model_copy(update={"storage_options": public})
    env[Env.CHECKPOINT] = json.dumps(
        ckpt.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    )
    env[Env.HEALTH] = json.dumps(
        spec.health.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    )
    env.update(spec.env)
    env.update(spec.node_env.get(node, {}))
    return dict(sorted(env.items()))


def agent_env(spec: JobSpec, facts: Facts, job_id: str, node: str) -> dict[str, str]:
    """The environment a node agent starts with (it lives across attempts): the job and node
    tags every process of the node inherits (how a node is found and killed), and the recipe's
    ``env``/``node_env`` (the health probes may need them, e.g. the fake NVML in tests)."""
    env = {
        Env.JOB_ID: job_id,
        Env.NODE: node,
        Env.STORAGE: facts.storage_root,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if warm_workers(spec):
        env[Env.WARM_WORKERS] = "1"
    env.update(spec.env)
    env.update(spec.node_env.get(node, {}))
    return dict(sorted(env.items()))


def gate_plan(spec: JobSpec, facts: Facts) -> GatePlan:
    """The health gate's settings: the recipe's ``health:`` section and the job's paths."""
    paths = [facts.run_dir, facts.storage_root]
    if facts.checkpoint_root:
        paths.append(facts.checkpoint_root)
    if spec.checkpoint.memory.enabled:
        paths.append(MEMORY_BASE)  # the memory tier's tmpfs: present, and with room
    return GatePlan(
        paths=tuple(dict.fromkeys(paths)),
        min_free_disk_gb=spec.health.min_free_disk_gb,
        require_nvml=spec.health.require_nvml,
        probe_interval_s=spec.health.probe_interval_s,
    )


def plan_attempt(
    spec: JobSpec,
    facts: Facts,
    job_id: str,
    attempt: int,
    nodes: tuple[str, ...],
    excluded: tuple[str, ...] = (),
    spares: tuple[str, ...] = (),
) -> LaunchPlan:
    """The commands for one attempt on `nodes` (already stripped of excluded ones)."""
    assert nodes, "an attempt needs at least one node"
    node_plans = []
    for name in nodes:
        error_dir = f"{facts.run_dir}/attempt-{attempt}/{name}"
        node_plans.append(
            NodePlan(
                name=name,
                argv=torchrun_argv(spec, facts, job_id, attempt, len(nodes), error_dir),
                env=tuple(node_env(spec, facts, job_id, attempt, name).items()),
                log_path=f"{facts.run_dir}/logs/{name}.log",
                error_dir=error_dir,
            )
        )
    port = str(facts.rdzv_port) if facts.rdzv_port else "<rdzv-port>"
    return LaunchPlan(
        job_id=job_id,
        attempt=attempt,
        world_size=0 if spec.per_gpu else len(nodes) * int(spec.nproc_per_node),
        rdzv_endpoint=f"{facts.rdzv_host}:{port}",
        nodes=tuple(node_plans),
        excluded=excluded,
        spares=spares,
        gate=gate_plan(spec, facts),
        secrets=tuple(sorted(spec.secrets)),
    )


def render_plan(plan: LaunchPlan) -> str:
    """Human- and diff-friendly text of a plan: per node, the env and the exact argv."""
    world = str(plan.world_size) if plan.world_size else "one worker per GPU of each node"
    lines = [
        f"job {plan.job_id} attempt {plan.attempt}: {len(plan.nodes)} node(s), "
        f"world size {world}, rendezvous {plan.rdzv_endpoint}",
    ]
    if plan.excluded:
        lines.append(f"excluded: {', '.join(plan.excluded)}")
    if plan.spares:
        lines.append(f"spares: {', '.join(plan.spares)}")
    lines.append(plan.gate.describe())
    if plan.secrets:
        shown = ", ".join(f"{name}={REDACTED}" for name in plan.secrets)
        lines.append(f"secrets (for the workers only, never stored): {shown}")
    for node in plan.nodes:
        lines.append("")
        lines.append(f"[{node.name}]  log: {node.log_path}")
        for key, value in node.env:
            lines.append(f"  {key}={shlex.quote(value)}")
        lines.append("  " + " \\\n    ".join(shlex.quote(arg) for arg in node.argv))
    return "\n".join(lines)
