"""`trainctl launch --scheduler slurm`: store the job, render its batch script, submit it.

The request comes from the recipe's ``slurm:`` section with `launch`'s flags on top
(`apply_flags`); the result is the spec that is stored, so requeues and `trainctl resume` see
the same request, and `slurm_options` is the one place it becomes the renderer's
`SlurmOptions`. Before anything is stored, Slurm is asked whether it could ever run the
request (``sbatch --test-only``): a request the cluster cannot satisfy (more GPUs than a node
has, an unknown GPU type, reservation or partition) ends `launch` with one message and exit 2,
leaving no job behind.

The batch script runs `trainctl resume JOB` on the allocation's first node, on the first run
and after every requeue (`trainctl/launch/sbatch.py`); `launch` itself returns once Slurm has
the job, printing the trainctl job id and the Slurm job id.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import typer
from pydantic import ValidationError

from trainctl import schedulers
from trainctl.cli.console import emit_json, emit_result, terminal
from trainctl.env import Env
from trainctl.errors import TrainctlError, UserError
from trainctl.events import Event, JobCreated, JobFailed, Submitted
from trainctl.exitcodes import ExitCode
from trainctl.launch.sbatch import SlurmOptions, render_sbatch
from trainctl.recipe import spec_to_yaml, validation_problems
from trainctl.recovery.journal import new_record
from trainctl.spec import JobSpec, SlurmSpec
from trainctl.state import JobState
from trainctl.store import JobStore


@dataclasses.dataclass(frozen=True)
class SlurmFlags:
    """`launch`'s Slurm flags (None or empty: not given); they override the ``slurm:``
    section field by field, and `--sbatch-arg`s are appended to its `extra_args`."""

    partition: str | None = None
    time_limit: str | None = None
    gpus_per_node: str | None = None
    """`N` or `TYPE:N`, as sbatch's `--gpus-per-node` takes it."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    exclusive: bool | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    sbatch_args: tuple[str, ...] = ()

    def given(self) -> list[str]:
        """The flags given, by name (`--partition`, ...)."""
        return [
            FLAG_OF_FIELD[field.name]
            for field in dataclasses.fields(self)
            if getattr(self, field.name) not in (None, ())
        ]


FLAG_OF_FIELD = {
    "partition": "--partition",
    "time_limit": "--time",
    "gpus_per_node": "--gpus-per-node",
    "gpu_type": "--gpus-per-node",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "reservation": "--reservation",
    "exclusive": "--exclusive",
    "mem": "--mem",
    "cpus_per_task": "--cpus-per-task",
    "sbatch_args": "--sbatch-arg",
    "extra_args": "--sbatch-arg",
}


def apply_flags(spec: JobSpec, flags: SlurmFlags) -> JobSpec:
    """`spec` with `flags` over its ``slurm:`` section, validated as the recipe's section is.
    Raises `UserError` naming the flag."""
    update: dict[str, Any] = {
        name: value
        for name, value in dataclasses.asdict(flags).items()
        if value is not None and name not in ("gpus_per_node", "sbatch_args")
    }
    if flags.gpus_per_node is not None:
        update.update(_parse_gpus(flags.gpus_per_node))
    if flags.sbatch_args:
        update["extra_args"] = (*spec.slurm.extra_args, *flags.sbatch_args)
    if not update:
        return spec
    try:
        slurm = SlurmSpec.model_validate({**spec.slurm.model_dump(), **update})
    except ValidationError as error:
        field = str(error.errors()[0].get("loc", ("",))[0])
        bad = validation_problems(error, "slurm")[0]  # the flag of the first: one message
        path = str(bad.where).replace(": ", ".", 1)  # "slurm: mem" -> "slurm.mem"
        raise UserError(
            bad.problem,
            where=f"{FLAG_OF_FIELD.get(field, 'command line')} ({path})",
            value=bad.value,
            has_value=bad.has_value,
            fix=bad.fix,
        ) from None
    return spec.model_copy(update={"slurm": slurm})


def _parse_gpus(text: str) -> dict[str, Any]:
    gpu_type, _, count = text.rpartition(":")
    if not count.isdigit():
        raise UserError(
            "not a GPU count",
            where="--gpus-per-node",
            value=text,
            fix="give N or TYPE:N, e.g. 8 or h100:8 (0: no GPUs)",
        )
    return {"gpus_per_node": int(count), "gpu_type": gpu_type or None}


def slurm_options(spec: JobSpec) -> SlurmOptions:
    """The renderer's options: the stored spec's ``slurm:`` section, every field of it."""
    slurm = spec.slurm
    return SlurmOptions(
        partition=slurm.partition,
        time_limit=slurm.time_limit,
        gpus_per_node=slurm.gpus_per_node,
        gpu_type=slurm.gpu_type,
        gpu_request=slurm.gpu_request,
        account=slurm.account,
        qos=slurm.qos,
        constraint=slurm.constraint,
        reservation=slurm.reservation,
        exclusive=slurm.exclusive,
        mem=slurm.mem,
        cpus_per_task=slurm.cpus_per_task,
        signal_grace_s=slurm.signal_grace_s,
        extra_args=slurm.extra_args,
    )


def submit(
    spec: JobSpec,
    store: JobStore,
    job_id: str,
    target: str,
    flags: SlurmFlags,
    dry_run: bool,
    as_json: bool,
) -> None:
    spec = apply_flags(spec, flags)
    run_dir = store.local_job_dir(job_id, create=False)
    script = render_sbatch(
        job_id,
        spec.name,
        spec.nodes + spec.spare_nodes,
        slurm_options(spec),
        exclude=[],
        python=sys.executable,
        storage_root=store.root,
        workdir=os.getcwd(),
        log_path=str(run_dir / "slurm.log"),
        env={Env.STORAGE: store.root},
    )
    if dry_run:
        if as_json:
            emit_json(
                {
                    "argv": list(script.argv),
                    "script_path": script.script_path,
                    "script": script.text,
                }
            )
        else:
            emit_result(script.describe())
        return
    # Nothing is stored until Slurm says it could run the request: a refusal leaves no job.
    schedulers.check_request(script)
    store.local_job_dir(job_id, create=True)
    now = time.time()
    record = new_record(job_id, spec, now)
    record.scheduler = "slurm"
    record.nodes = []  # the allocation names them, on each (re)start
    store.create(record, spec_to_yaml(spec))
    store.append_event(
        job_id,
        Event(
            now,
            f"{spec.name}: {spec.nodes} node(s) x {spec.nproc_per_node} worker(s) on Slurm",
            JobCreated(target=target, scheduler="slurm"),
        ),
    )
    try:
        slurm_job_id = schedulers.submit(script)
    except TrainctlError as error:
        # Slurm took the request a moment ago (--test-only) and not now: the job record says so.
        reason = f"sbatch did not take the job: {error}"
        record.move(JobState.FAILED, reason)
        record.exit_code = int(error.exit_code)
        store.write_state(record)
        store.append_event(
            job_id, Event(time.time(), reason, JobFailed(exit_code=record.exit_code))
        )
        raise
    record.scheduler_job_id = slurm_job_id
    store.write_state(record)
    store.append_event(
        job_id,
        Event(
            time.time(),
            f"submitted to Slurm as job {slurm_job_id}",
            Submitted(slurm_job_id=slurm_job_id, script=script.script_path),
        ),
    )
    if as_json:
        emit_json({"job_id": job_id, "slurm_job_id": slurm_job_id})
    else:
        emit_result(job_id)
    terminal.info(
        f"job {job_id}: submitted to Slurm as job {slurm_job_id} "
        f"({spec.nodes + spec.spare_nodes} node(s)); `trainctl status {job_id}` follows it"
    )
    raise typer.Exit(int(ExitCode.FINISHED))
