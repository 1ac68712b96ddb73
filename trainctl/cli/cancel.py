"""`trainctl cancel JOB`: stop a job from any shell or host that can write its store.

It writes a cancel request (`trainctl.cancel`) and waits for the job's controller to act on
it: the controller stops every process of the job within about a second, records the job
``cancelled`` with who asked and why, and exits with code 7. A job whose controller is gone
(no live lease: a Slurm job still pending, a controller that died) is marked cancelled here.
On Slurm the job is then `scancel`ed too, so no requeue or pending allocation brings it back.
`trainctl resume` refuses a cancelled job unless `--force`.
"""

from __future__ import annotations

import time

import typer

from trainctl.cancel import CancelRequest, request_cancel
from trainctl.cli.common import JSON_OPTION, STORAGE_OPTION, open_job
from trainctl.cli.console import emit_json, emit_result, terminal
from trainctl.errors import TrainctlError
from trainctl.exitcodes import ExitCode
from trainctl.lease import Lease, LeaseHeld
from trainctl.recovery.journal import Journal
from trainctl.state import JobRecord, JobState
from trainctl.store import JobStore

POLL_S = 0.2


def cancel(
    job_id: str = typer.Argument(..., help="The job to cancel."),
    reason: str = typer.Option("", "--reason", help="Why (recorded with who asked)."),
    wait_s: float = typer.Option(
        30.0, "--wait", min=0, help="Seconds to wait for the controller to stop the job."
    ),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Cancel a job: its controller stops every process and records who and why."""
    store, job_id = open_job(storage, job_id)  # a unique prefix will do
    record = store.read_state(job_id)
    if record.state.terminal:
        _report(record, f"job {job_id} already {record.state.value}: nothing to cancel", as_json)
        raise typer.Exit(0)
    request = request_cancel(store, job_id, reason)
    terminal.info(f"job {job_id}: cancel requested ({request.describe()}); waiting for it")
    record = _wait(store, job_id, wait_s)
    if not record.state.terminal:
        record = _cancel_without_controller(store, record, request, wait_s)
    scheduler = _scancel(record)
    if record.state is not JobState.CANCELLED:
        _report(record, f"job {job_id} ended {record.state.value} first: {record.reason}", as_json)
        raise typer.Exit(0)
    extra = f"; {scheduler}" if scheduler else ""
    _report(record, f"job {job_id} cancelled: {record.reason}{extra}", as_json)
    raise typer.Exit(0)


def _wait(store: JobStore, job_id: str, wait_s: float) -> JobRecord:
    deadline = time.monotonic() + wait_s
    record = store.read_state(job_id)
    while not record.state.terminal and time.monotonic() < deadline:
        time.sleep(POLL_S)
        record = store.read_state(job_id)
    return record


def _cancel_without_controller(
    store: JobStore, record: JobRecord, request: CancelRequest, wait_s: float
) -> JobRecord:
    """No controller acted: if none holds the job (its lease is free or stale), record the
    cancellation here; if one does, it is alive but has not acted — say so."""
    lease = Lease(store, record.job_id)
    try:
        lease.acquire()
    except LeaseHeld:
        raise TrainctlError(
            f"job {record.job_id}: its controller holds the job but did not act on the cancel "
            f"request within {wait_s:g} s; the request stays: it acts when it next looks"
        ) from None
    try:
        record = store.read_state(record.job_id)  # under the lease: nobody else writes it
        if not record.state.terminal:
            if record.scheduler == "slurm":
                _scancel(record)  # first: a pending batch script must not start now
            Journal(store, record).cancel_job(request, ExitCode.CANCELLED)
    finally:
        lease.release()
    return record


def _scancel(record: JobRecord) -> str | None:
    from trainctl import schedulers

    try:
        return schedulers.cancel(record)
    except Exception as error:  # the store says cancelled; say what the scheduler did not do
        terminal.warn(f"job {record.job_id}: scancel failed: {error}")
        return None


def _report(record: JobRecord, line: str, as_json: bool) -> None:
    terminal.info(line)
    if as_json:
        emit_json(
            {
                "job_id": record.job_id,
                "state": record.state.value,
                "reason": record.reason,
                "cancel": record.cancel,
            }
        )
    else:
        emit_result(record.state.value)
