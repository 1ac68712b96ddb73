"""Running a job's controller in this process: `launch` and `resume` both end up here.

`run_job` holds the job's lease (`trainctl.lease`) for as long as the controller runs,
renewing it; the journal writes nothing once the lease is lost, and the controller abandons
the attempt. `prepare_resume` is what `trainctl resume` does before that: take the lease
(refused while a live controller has it), read the job back — its stored spec with the secret
values restored from where the user put them — clear a dead controller's leftovers, and close
its interrupted attempt. When the controller ends, the scheduler binding carries out what
`placement.after_run` decides (Slurm: requeue, drain).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping

from trainctl.cancel import pending_requests
from trainctl.errors import UserError
from trainctl.events import LeaseTaken
from trainctl.exitcodes import ExitCode
from trainctl.lease import Lease
from trainctl.recipe import restore_secrets, spec_from_yaml
from trainctl.recovery.controller import Controller, ControllerOptions
from trainctl.recovery.journal import Journal
from trainctl.recovery.live_view import MetricsEndpoint
from trainctl.schedulers import Binding, bind, clear_leftovers
from trainctl.secrets import Redactor
from trainctl.spec import JobSpec
from trainctl.state import JobRecord, JobState
from trainctl.store import JobStore

Say = Callable[[str], None]


@dataclasses.dataclass
class Resumed:
    """A job picked up by `prepare_resume`: ready to run (or already finished)."""

    spec: JobSpec | None
    """None when the job already succeeded: nothing to run."""
    record: JobRecord
    binding: Binding | None
    lease: Lease


def _release_memory(job_id: str) -> bool:
    """`trainctl.checkpoint.memory.release_memory`, imported when called: that module imports
    torch (2-4 s), and every CLI command imports this one (`status` took 4.5 s at 1,024 nodes,
    most of it importing torch)."""
    from trainctl.checkpoint.memory import release_memory

    return release_memory(job_id)


def run_job(
    spec: JobSpec,
    store: JobStore,
    record: JobRecord,
    binding: Binding,
    lease: Lease,
    say: Say,
    warn: Say,
    metrics: MetricsEndpoint | None = None,
) -> ExitCode:
    """Run the job's controller here to the end (the caller holds `lease`); returns the exit
    code, after the binding did what the scheduler must (requeue, drain). `metrics`: the
    ``/metrics`` server to feed while it runs (closed when it ends)."""
    secrets = spec.job_secrets()
    journal = Journal(
        store, record, Redactor(secrets.values()), writable=lambda: not lease.lost.is_set()
    )
    controller = Controller(
        spec,
        journal,
        ControllerOptions(
            python=sys.executable,
            rdzv_host=binding.rdzv_host,
            rdzv_port=spec.launch.rdzv_port,
            node_addr=binding.node_addr,
            restart_count=binding.restart_count,
            secrets=secrets,
            on_message=say,
            abandoned=lease.lost.is_set,
            metrics=metrics,
        ),
        scheduler=binding.scheduler,
    )
    controller.install_signal_handlers()
    lease.start_renewing()
    try:
        code = controller.run()
    finally:
        # The memory tier lives as long as the job's controller (a resume restores from
        # durable storage), unless another controller took the job over.
        if not lease.lost.is_set():
            _release_memory(record.job_id)
        lease.release()
    if lease.lost.is_set():
        warn(f"job {record.job_id}: another controller took the job over; this one stopped")
        return ExitCode.FAILED
    binding.after_run(code, spec, journal, warn)
    return code


def prepare_resume(
    store: JobStore,
    job_id: str,
    environ: Mapping[str, str],
    say: Say,
    warn: Say,
    force: bool = False,
) -> Resumed:
    """Pick a job up from the store; raises `LeaseHeld` while its controller runs, and a
    `UserError` for a cancelled job unless `force` (which sets its cancel requests aside)."""
    store.read_state(job_id)  # an unknown job: one clear error, before any lease is taken
    text = store.read_spec_text(job_id)
    if text is None:
        raise UserError(
            "the job has no stored spec",
            where=f"{store.job_url(job_id)}/spec.yaml",
            fix="the job store is incomplete; launch the job again",
        )
    stored = spec_from_yaml(text, f"{store.job_url(job_id)}/spec.yaml")
    lease = Lease(store, job_id, stored.launch.lease_ttl_s)
    previous = lease.acquire()
    # With the lease held, whatever of the job still runs on this host is a dead
    # controller's leftover, and nobody else writes the record.
    record = store.read_state(job_id)
    if record.state == JobState.SUCCEEDED:
        return Resumed(None, record, None, lease)
    pending = pending_requests(store, job_id, record.cancels_cleared)
    if (record.state == JobState.CANCELLED or pending) and not force:
        lease.release()
        raise UserError(
            f"the job was cancelled ({record.reason if record.cancel else pending[0].describe()})",
            where=f"job {job_id}",
            fix=f"`trainctl resume {job_id} --force` runs it again anyway",
        )
    record.cancels_cleared = [*record.cancels_cleared, *(r.id for r in pending)]
    if record.state == JobState.CANCELLED:
        record.cancel = None  # the event log keeps who cancelled it and why
    spec, missing = restore_secrets(stored, environ)
    for name in missing:
        warn(
            f"secret {name} of the recipe is not available (the recipe {stored.source} is gone "
            "or changed, and the environment does not set it): the job runs without it"
        )
    try:
        binding = bind(record, environ, spec, store.read_blocklist(job_id))
    except BaseException:
        lease.release()  # nothing started: the next resume takes the job at once
        raise
    clear_leftovers(job_id, warn)
    if _release_memory(job_id):
        warn(
            f"job {job_id}: dropped the memory checkpoints the previous controller left on this "
            "host; the job restores from durable storage"
        )
    journal = Journal(store, record)
    if previous is not None:
        journal.event(
            LeaseTaken(host=lease.host, pid=lease.pid, previous=previous.describe()),
            f"took the job over from the controller {previous.describe()}, silent or gone",
        )
    journal.close_interrupted_attempt(time.time())
    journal.resumed()
    say(f"resuming job {job_id} from the store {store.root}")
    return Resumed(spec, record, binding, lease)
