"""`trainctl resume JOB`: pick a job up from the store and run it on — idempotently.

What schedulers call on requeue and what on-call runs after the controller itself died. The
work is `trainctl.recovery.run.prepare_resume` (the lease, the stored spec, leftovers, the
interrupted attempt) and `run_job`; this command only reports. A job that already succeeded is
left alone (exit 0); one whose controller still runs is refused (exit 2).
"""

from __future__ import annotations

import os

import typer

from trainctl.cli.common import JOB_HELP, JSON_OPTION, STORAGE_OPTION, open_job
from trainctl.cli.console import emit_json, terminal
from trainctl.cli.launch import finish, say, warn
from trainctl.cli.metrics import METRICS_HOST_OPTION, METRICS_PORT_OPTION, start_metrics
from trainctl.cli.progress import StepProgress
from trainctl.recovery.run import prepare_resume, run_job


def resume(
    job_id: str = typer.Argument(..., help=f"The job to resume. {JOB_HELP}"),
    storage: str | None = STORAGE_OPTION,
    force: bool = typer.Option(
        False, "--force", help="Resume a job someone cancelled (`trainctl cancel`)."
    ),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Resume a job from its newest committed checkpoint (idempotent; scheduler hook)."""
    store, job_id = open_job(storage, job_id)
    resumed = prepare_resume(store, job_id, os.environ, say, warn, force=force)
    record = resumed.record
    if resumed.spec is None or resumed.binding is None:
        resumed.lease.release()
        terminal.info(f"job {job_id} already succeeded: nothing to resume")
        if as_json:
            emit_json(
                {
                    "job_id": job_id,
                    "state": record.state.value,
                    "exit_code": 0,
                    "final_step": record.final_step,
                    "fingerprint": record.fingerprint,
                    "reason": record.reason,
                }
            )
        raise typer.Exit(0)
    try:
        endpoint = start_metrics(metrics_host, metrics_port)
    except BaseException:
        resumed.lease.release()
        raise
    with StepProgress(record, resumed.spec.max_steps, resuming=True):
        code = run_job(
            resumed.spec, store, record, resumed.binding, resumed.lease, say, warn, endpoint
        )
    finish(record, code, as_json)
