"""`trainctl launch --scheduler ray`: the controller runs here as a Ray driver.

Before anything is stored or started, the cluster is asked whether it could hold the job
(exit 2 when it never could); then the job is stored, its placement group made and waited on
(exit 1 when Ray cannot place it in time: `trainctl resume` picks the job up later), and the
controller runs the job on the group's bundles, as it does on the local scheduler.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from trainctl.events import Event, JobCreated
from trainctl.exitcodes import ExitCode
from trainctl.launch.ray_placement import actor_spec, render_request
from trainctl.lease import Lease
from trainctl.recipe import spec_to_yaml
from trainctl.recovery.journal import Journal, new_record
from trainctl.recovery.live_view import MetricsEndpoint
from trainctl.recovery.run import run_job
from trainctl.spec import JobSpec
from trainctl.state import JobRecord, JobState
from trainctl.store import JobStore

Say = Callable[[str], None]


def dry_run(spec: JobSpec, job_id: str) -> tuple[str, dict[str, Any]]:
    """The placement group and the actor pinned to each bundle (text, JSON); no Ray needed."""
    from trainctl.launch.ray_binding import request_for

    request = request_for(spec, job_id)
    argv = [sys.executable, "-m", "trainctl.launch.agent", "<ray node id>", "<control endpoint>"]
    actors = [actor_spec(request, index, argv) for index in range(request.num_bundles)]
    return render_request(request, actors), {"placement_group": request.to_json(), "actors": actors}


def launch(
    spec: JobSpec,
    store: JobStore,
    job_id: str,
    target: str,
    address: str,
    timeout_s: float,
    say: Say,
    warn: Say,
    metrics: MetricsEndpoint | None = None,
) -> tuple[JobRecord, ExitCode]:
    """Run the job on the Ray cluster at `address` to its end; (its record, its exit code).
    `metrics`: the `/metrics` server the controller feeds while it runs."""
    from trainctl.launch import ray_binding, ray_nodes

    ray_nodes.connect(address)
    request = ray_binding.request_for(spec, job_id)
    try:
        ray_binding.check(request, first_run=True)  # never: UserError, nothing stored
        short: ray_nodes.PlacementShort | None = None
    except ray_nodes.PlacementShort as error:
        short = error  # stored, then ended: `resume` picks it up when capacity returns
    now = time.time()
    record = new_record(job_id, spec, now)
    record.scheduler = "ray"
    store.create(record, spec_to_yaml(spec))
    lease = Lease(store, job_id, spec.launch.lease_ttl_s)
    lease.acquire()
    store.append_event(
        job_id,
        Event(
            now,
            f"{spec.name}: {spec.nodes} node(s) x {spec.nproc_per_node} worker(s) on Ray",
            JobCreated(target=target, scheduler="ray"),
        ),
    )
    say(f"job {job_id}: waiting up to {timeout_s:g} s for placement group {request.name}")
    try:
        if short is not None:
            raise short
        binding = ray_binding.bind(record, spec, request, timeout_s)
    except ray_nodes.PlacementShort as shortfall:
        code = Journal(store, record).end_job(
            JobState.FAILED,
            f"{shortfall}; `trainctl resume {job_id}` when capacity returns",
            ExitCode.FAILED,
        )
        lease.release()
        return record, code
    store.write_state(record)
    say(
        f"job {job_id}: placement group {record.scheduler_job_id}: "
        + ", ".join(f"{n.name[:12]}@{n.host}" for n in record.nodes)
    )
    return record, run_job(spec, store, record, binding, lease, say, warn, metrics)
