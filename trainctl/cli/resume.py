"""`trainctl resume JOB`: pick a job up from the store and run it on — idempotently.

What schedulers call on requeue and what on-call runs after the controller itself died. It
reads the job store, refuses if the job's controller is still running (a lock held for the
controller's lifetime, plus its recorded pid), waits for what is left of the dead controller's
processes to go (its agents tear themselves down when it vanishes) and kills only what is still
there, closes the interrupted attempt, and runs the controller: the next attempt restores the
newest committed checkpoint. A job that already succeeded is left alone (exit 0).
"""

from __future__ import annotations

import os
import sys
import time

import typer
from rich.markup import escape

from trainctl.cli.common import JSON_OPTION, STORAGE_OPTION, open_store
from trainctl.cli.console import emit_json, terminal
from trainctl.cli.launch import controller_lock, run_controller
from trainctl.errors import UserError
from trainctl.exitcodes import ExitCode
from trainctl.launch import proctree
from trainctl.launch.slurm import SlurmClient, SlurmError
from trainctl.launch.slurm_nodes import SlurmAllocation, SlurmNodes, inside_allocation
from trainctl.spec import JobSpec, check_job_id, spec_from_yaml
from trainctl.state import AttemptState, Event, JobRecord, JobState, NodeRecord, NodeState
from trainctl.store import JobStore

LEFTOVER_WAIT_S = 15.0
"""How long the dead controller's agents get to tear their nodes down by themselves (they do
when its connection drops); what is left after that is killed."""


def resume(
    job_id: str = typer.Argument(..., help="The job to resume."),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Resume a job from its newest committed checkpoint (idempotent; scheduler hook)."""
    store = open_store(storage)
    check_job_id(job_id, where="JOB")
    store.read_state(job_id)  # an unknown job: one clear error, no lock file left behind
    # The lock first: while another controller runs, nothing is read, killed or written. It
    # is released only when that controller's process ends (however it ends), so once we
    # hold it, whatever of the job is still running here is a dead controller's leftover.
    lock = controller_lock(store, job_id)
    record = store.read_state(job_id)
    if record.state == JobState.SUCCEEDED:
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
    text = store.read_spec_text(job_id)
    if text is None:
        raise UserError(
            "the job has no stored spec",
            where=f"{store.job_url(job_id)}/spec.yaml",
            fix="the job store is incomplete; launch the job again",
        )
    spec = spec_from_yaml(text, f"{store.job_url(job_id)}/spec.yaml")
    slurm = _slurm_allocation(record)
    _clear_leftovers(job_id)
    now = time.time()
    if record.attempts and record.attempts[-1].state in (
        AttemptState.STARTING,
        AttemptState.RUNNING,
    ):
        attempt = record.attempts[-1]
        attempt.ended_at = now
        attempt.cause = "controller_lost"
        attempt.move(AttemptState.FAILED, "the controller stopped without ending the attempt")
        store.append_event(
            job_id,
            Event(
                time=now,
                kind="attempt_ended",
                message=f"attempt {attempt.number} failed: its controller went away",
                attempt=attempt.number,
                data={
                    "outcome": "controller_lost",
                    "reason": "controller lost",
                    "cause": "controller_lost",
                    "blamed": None,
                    "first_step": attempt.first_step,
                    "first_step_at": attempt.first_step_at,
                    "last_step": attempt.last_step,
                    "last_step_at": attempt.last_step_at,
                    "restored_step": attempt.restored_step,
                    "failed_at": attempt.last_step_at,
                    "decided_at": now,
                },
            ),
        )
    for node in record.nodes:
        if node.state in (NodeState.STARTING, NodeState.RUNNING):
            node.move(NodeState.FAILED, "controller lost")
        node.pid = None
    was, was_pending = record.state.value, record.state == JobState.PENDING
    if not was_pending:
        record.move(JobState.RECOVERING, "resumed")
    store.write_state(record)
    store.append_event(
        job_id,
        Event(
            time=now,
            kind="job_resumed",
            message=(
                "started by the scheduler"
                if was_pending
                else f"resumed (was {was}); restoring the newest committed checkpoint"
            ),
            data={"committed_step": record.committed_step},
        ),
    )
    terminal.info(f"resuming job [bold]{job_id}[/bold] from the store {store.root}")
    if slurm is None:
        run_controller(spec, store, record, as_json, lock=lock)
        return
    client, allocation = slurm
    run_controller(
        spec,
        store,
        record,
        as_json,
        scheduler=SlurmNodes(allocation.slurm_job_id, sys.executable, client),
        rdzv_host=allocation.address,
        after=lambda code: _after_slurm_run(store, spec, record, client, allocation, code),
        lock=lock,
    )


def _slurm_allocation(record: JobRecord) -> tuple[SlurmClient, SlurmAllocation] | None:
    """Inside the job's Slurm allocation: read it (once, here) and make its nodes the job's."""
    if record.scheduler != "slurm" or not inside_allocation():
        return None
    client = SlurmClient()
    allocation = SlurmAllocation.from_env(client, os.environ)
    known = {node.name: node for node in record.nodes}
    record.nodes = [known.get(name) or NodeRecord(name=name) for name in allocation.nodes] + [
        n for n in record.nodes if n.name not in allocation.nodes and n.state == NodeState.EXCLUDED
    ]
    record.scheduler_job_id = allocation.slurm_job_id
    return client, allocation


def _after_slurm_run(
    store: JobStore,
    spec: JobSpec,
    record: JobRecord,
    client: SlurmClient,
    allocation: SlurmAllocation,
    code: ExitCode,
) -> None:
    """The last thing the batch process does: requeue the job when it should run again.

    Preempted (exit 4): `scontrol requeue` — the next run resumes from the checkpoint just
    committed. Failed with nodes excluded (exit 1: the allocation could not continue): requeue
    with the blocklist as the job's ExcNodeList, draining the nodes if the recipe says so.
    """
    now = time.time()
    excluded = sorted(
        name
        for name, entry in store.read_blocklist(record.job_id).items()
        if float(entry.get("expires_at", 0)) > now
    )
    if code == ExitCode.FAILED and excluded:
        if spec.recovery.drain_blamed_nodes:
            for name in excluded:
                try:
                    client.drain(name, f"trainctl job {record.job_id}: {record.reason}"[:200])
                except SlurmError as error:
                    terminal.warn(escape(f"could not drain {name}: {error}"))
        _event(
            store,
            record,
            "requeue",
            f"requeued by trainctl, excluding {', '.join(excluded)}",
            excluded=excluded,
        )
        client.requeue_excluding(allocation.slurm_job_id, excluded)
    elif code == ExitCode.PREEMPTED:
        _event(store, record, "requeue", "requeued by trainctl after preemption")
        client.requeue(allocation.slurm_job_id)


def _event(store: JobStore, record: JobRecord, kind: str, message: str, **data: object) -> None:
    store.append_event(
        record.job_id, Event(time=time.time(), kind=kind, message=message, data=data)
    )


def _clear_leftovers(job_id: str) -> None:
    """Wait for the dead controller's processes on this host to go; kill what stays."""
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while time.monotonic() < deadline:
        if not proctree.tagged("TRAINCTL_JOB_ID", job_id):
            return
        time.sleep(0.1)
    left = proctree.tagged("TRAINCTL_JOB_ID", job_id)
    terminal.warn(f"killing {len(left)} process(es) left by the previous controller")
    proctree.kill_tree(left, grace_s=2.0)
