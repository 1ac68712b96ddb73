"""`trainctl launch --scheduler slurm`: store the job, render its batch script, submit it.

The batch script runs `trainctl resume JOB` on the allocation's first node, on the first run
and after every requeue (`trainctl/launch/sbatch.py`); `launch` itself returns once Slurm has
the job, printing the trainctl job id and the Slurm job id.
"""

from __future__ import annotations

import os
import sys
import time

import typer

from trainctl.cli.console import emit_json, emit_result, terminal
from trainctl.env import Env
from trainctl.events import Event, JobCreated, Submitted
from trainctl.launch.sbatch import SlurmOptions, render_sbatch
from trainctl.recipe import spec_to_yaml
from trainctl.recovery.journal import new_record
from trainctl.schedulers import submit as submit_batch
from trainctl.spec import JobSpec
from trainctl.store import JobStore


def slurm_options(spec: JobSpec, partition: str | None, time_limit: str | None) -> SlurmOptions:
    return SlurmOptions(
        partition=partition,
        time_limit=time_limit,
        drain_bad_nodes=spec.recovery.drain_blamed_nodes,
    )


def submit(
    spec: JobSpec,
    store: JobStore,
    job_id: str,
    target: str,
    partition: str | None,
    time_limit: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    options = slurm_options(spec, partition, time_limit)
    run_dir = store.local_job_dir(job_id, create=not dry_run)
    script = render_sbatch(
        job_id,
        spec.name,
        spec.nodes + spec.spare_nodes,
        options,
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
    slurm_job_id = submit_batch(script)
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
    raise typer.Exit(0)
