"""`trainctl launch RECIPE.yaml | SCRIPT.py [options] [-- SCRIPT_ARGS]`."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape

from trainctl import schedulers
from trainctl.cli import ray_launch, slurm_launch
from trainctl.cli.common import JSON_OPTION, STORAGE_OPTION, open_store
from trainctl.cli.console import emit_json, emit_result, terminal
from trainctl.cli.metrics import METRICS_HOST_OPTION, METRICS_PORT_OPTION, start_metrics
from trainctl.cli.progress import StepProgress
from trainctl.cli.slurm_launch import SlurmFlags
from trainctl.errors import UserError
from trainctl.events import Event, JobCreated
from trainctl.exitcodes import ExitCode
from trainctl.launch.plan import Facts, plan_attempt, render_plan
from trainctl.lease import Lease
from trainctl.recipe import load_recipe, parse_fault, script_spec, spec_to_yaml
from trainctl.recovery.faults import check_faults
from trainctl.recovery.journal import new_record
from trainctl.recovery.run import run_job
from trainctl.spec import FAULT_KINDS, JobSpec, check_job_id
from trainctl.state import JobRecord
from trainctl.store import JobStore


def _load_spec(target: str, script_args: list[str], overrides: dict[str, object]) -> JobSpec:
    suffix = Path(target).suffix.lower()
    if suffix in (".yaml", ".yml"):
        spec = load_recipe(target, overrides)
        if script_args:
            spec = spec.model_copy(update={"args": (*spec.args, *script_args)})
        return spec
    if suffix == ".py":
        return script_spec(target, script_args, overrides)
    raise UserError(
        "cannot tell what to launch",
        where="TARGET",
        value=target,
        fix="pass a recipe (.yaml/.yml) or a training script (.py)",
    )


def _new_job_id(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:32].strip("-") or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _dry_run(spec: JobSpec, store: JobStore, job_id: str, as_json: bool, ray: bool = False) -> None:
    root = store.root
    run_dir = f"{store.job_url(job_id)}" if store.local else f"~/.cache/trainctl/{job_id}"
    facts = Facts(
        python=sys.executable,
        storage_root=root,
        run_dir=run_dir,
        rdzv_port=spec.launch.rdzv_port,
        checkpoint_root=store.checkpoint_root(job_id, spec.checkpoint.storage),
        secrets_file=f"{run_dir}/private/secrets.json" if spec.secrets else "",
        node_addr=schedulers.local().node_addr,
    )
    nodes = tuple(f"node-{i}" for i in range(spec.nodes))
    spares = tuple(f"node-{i}" for i in range(spec.nodes, spec.nodes + spec.spare_nodes))
    plan = plan_attempt(spec, facts, job_id, 0, nodes, spares=spares)
    ray_text, ray_json = ray_launch.dry_run(spec, job_id) if ray else ("", {})
    if as_json:
        emit_json({**plan.to_json(), **({"ray": ray_json} if ray else {})})
    else:
        emit_result(f"{ray_text}\n{render_plan(plan)}" if ray else render_plan(plan))


def launch(
    target: str = typer.Argument(..., help="A recipe (.yaml) or a plain torchrun script (.py)."),
    script_args: list[str] | None = typer.Argument(
        None, help="Arguments for the script, after --."
    ),
    nodes: int | None = typer.Option(None, "--nodes", min=1, help="Number of nodes."),
    nproc_per_node: str | None = typer.Option(
        None,
        "--nproc-per-node",
        help="Worker processes per node: N, gpu (one per visible GPU) or auto.",
    ),
    storage: str | None = STORAGE_OPTION,
    job_id: str | None = typer.Option(None, "--job-id", help="Job id (default: name-time-random)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after S steps."),
    seed: int | None = typer.Option(None, "--seed", help="Override the recipe's seed."),
    rdzv_port: int | None = typer.Option(
        None,
        "--rdzv-port",
        min=0,
        max=65535,
        help="Rendezvous store port (default: launch.rdzv_port, else chosen at start).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run; start nothing."),
    scheduler: str = typer.Option(
        "local",
        "--scheduler",
        help="local (simulated nodes on this host), slurm (sbatch) or ray (a Ray cluster).",
    ),
    address: str = typer.Option(
        "auto", "--address", help="Ray: the cluster's address (auto: the one this host is in)."
    ),
    placement_timeout: float = typer.Option(
        60.0, "--place-timeout", min=0.0, help="Ray: seconds to wait for the placement group."
    ),
    partition: str | None = typer.Option(
        None, "--partition", help="Slurm: partition (overrides slurm.partition)."
    ),
    time_limit: str | None = typer.Option(
        None, "--time", help="Slurm: time limit, as sbatch --time (slurm.time_limit)."
    ),
    gpus_per_node: str | None = typer.Option(
        None,
        "--gpus-per-node",
        help="Slurm: GPUs per node, N or TYPE:N (slurm.gpus_per_node, slurm.gpu_type).",
    ),
    account: str | None = typer.Option(None, "--account", help="Slurm: account (slurm.account)."),
    qos: str | None = typer.Option(None, "--qos", help="Slurm: QOS (slurm.qos)."),
    constraint: str | None = typer.Option(
        None, "--constraint", help="Slurm: node features (slurm.constraint)."
    ),
    reservation: str | None = typer.Option(
        None, "--reservation", help="Slurm: reservation (slurm.reservation)."
    ),
    exclusive: bool | None = typer.Option(
        None, "--exclusive/--no-exclusive", help="Slurm: whole nodes (slurm.exclusive)."
    ),
    mem: str | None = typer.Option(
        None, "--mem", help="Slurm: memory per node, e.g. 500G; 0: all (slurm.mem)."
    ),
    cpus_per_task: int | None = typer.Option(
        None,
        "--cpus-per-task",
        min=1,
        help="Slurm: CPUs of each node's task (slurm.cpus_per_task).",
    ),
    sbatch_arg: list[str] | None = typer.Option(
        None,
        "--sbatch-arg",
        help="Slurm: one more sbatch option, long form, NAME=VALUE (slurm.extra_args); repeatable.",
    ),
    fault: list[str] | None = typer.Option(
        None,
        "--fault",
        help=f"Testing: inject KIND[:NODE]@step=N[,for=S] ({', '.join(FAULT_KINDS)}); "
        "repeatable; local scheduler only.",
    ),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Launch a job: run it to the end here (local scheduler) or submit it to Slurm."""
    overrides: dict[str, object] = {
        "nodes": nodes,
        "nproc_per_node": nproc_per_node,
        "max_steps": max_steps,
        "seed": seed,
    }
    if fault:
        overrides["faults"] = tuple(parse_fault(text).model_dump() for text in fault)
    if scheduler not in ("local", "slurm", "ray"):
        raise UserError(
            "unknown scheduler", where="--scheduler", value=scheduler, fix="use local, slurm or ray"
        )
    slurm_flags = SlurmFlags(
        partition=partition,
        time_limit=time_limit,
        gpus_per_node=gpus_per_node,
        account=account,
        qos=qos,
        constraint=constraint,
        reservation=reservation,
        exclusive=exclusive,
        mem=mem,
        cpus_per_task=cpus_per_task,
        sbatch_args=tuple(sbatch_arg or ()),
    )
    if scheduler in ("local", "ray") and slurm_flags.given():
        given = slurm_flags.given()
        raise UserError(
            f"{', '.join(given)}: Slurm option(s), for --scheduler slurm",
            where=given[0],
            fix="add --scheduler slurm, or drop them (a recipe's slurm: section is fine: "
            "the local scheduler ignores it)",
        )
    if scheduler == "slurm" and metrics_port is not None:
        raise UserError(
            "--metrics-port serves from a controller running here; with Slurm it runs in "
            "the allocation",
            where="--metrics-port",
            value=str(metrics_port),
            fix="drop --metrics-port; read the job with `trainctl metrics JOB` (for "
            "node_exporter's textfile collector) or `trainctl top JOB`",
        )
    spec = _load_spec(target, list(script_args or []), overrides)
    if rdzv_port is not None:
        spec = spec.model_copy(
            update={"launch": spec.launch.model_copy(update={"rdzv_port": rdzv_port})}
        )
    check_faults(spec, scheduler)
    store = open_store(storage, create=True)
    job = check_job_id(job_id) if job_id else _new_job_id(spec.name)
    if scheduler == "slurm":
        slurm_launch.submit(spec, store, job, target, slurm_flags, dry_run, as_json)
        return
    if dry_run:
        _dry_run(spec, store, job, as_json, ray=scheduler == "ray")
        return
    endpoint = start_metrics(metrics_host, metrics_port)
    if scheduler == "ray":
        if not as_json:
            emit_result(job)
        record, code = ray_launch.launch(
            spec, store, job, target, address, placement_timeout, say, warn, endpoint
        )
        finish(record, code, as_json)
        return
    now = time.time()
    record = new_record(job, spec, now)
    store.create(record, spec_to_yaml(spec))
    lease = Lease(store, job, spec.launch.lease_ttl_s)
    lease.acquire()
    store.append_event(
        job,
        Event(
            now,
            f"{spec.name}: {spec.nodes} node(s) x {spec.nproc_per_node} worker(s)",
            JobCreated(target=target),
        ),
    )
    if not as_json:
        emit_result(job)
    terminal.info(
        f"job [bold]{job}[/bold]: {spec.name}, {spec.nodes} node(s) x "
        f"{spec.nproc_per_node} worker(s), store {store.root}"
    )
    with StepProgress(record, spec.max_steps, resuming=False):
        code = run_job(spec, store, record, schedulers.local(), lease, say, warn, endpoint)
    finish(record, code, as_json)


def say(line: str) -> None:
    terminal.info(escape(line))


def warn(line: str) -> None:
    terminal.warn(escape(line))


def finish(record: JobRecord, code: ExitCode, as_json: bool) -> None:
    """Tell how the job ended (stderr; one JSON object on stdout with --json) and exit with
    its code."""
    summary = escape(f"job {record.job_id} {record.state.value}: {record.reason}")
    if record.fingerprint:
        summary += f"\n  final step {record.final_step}, fingerprint {record.fingerprint}"
    if code == 0:
        terminal.info(summary)
    elif record.state.value == "stopped":
        terminal.warn(summary)
    else:
        terminal.error(summary)
    if as_json:
        emit_json(
            {
                "job_id": record.job_id,
                "state": record.state.value,
                "exit_code": int(code),
                "final_step": record.final_step,
                "fingerprint": record.fingerprint,
                "reason": record.reason,
            }
        )
    raise typer.Exit(int(code))
