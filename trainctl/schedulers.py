"""What the CLI and `trainctl resume` need from schedulers, in one place.

The CLI never reaches into an adapter: it asks this module to

- `bind` a controller to where it runs (the local scheduler, or the Slurm allocation it is
  the batch process of: nodes, address, requeue count — read once, here, at the edge), and
  carry out what `placement.after_run` decides when the controller ends (requeue, drain);
- `check_request` and `submit` a batch job (Slurm), `describe` a job as its scheduler sees
  it (`status`);
- `clear_leftovers` of a dead controller on this host before a resume.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainctl.events import Requeued
from trainctl.exitcodes import ExitCode
from trainctl.launch import proctree
from trainctl.launch.local import LocalScheduler
from trainctl.launch.sbatch import SbatchScript
from trainctl.launch.scheduler import NodeScheduler
from trainctl.launch.slurm import SlurmClient, SlurmError
from trainctl.launch.slurm_nodes import SlurmAllocation, SlurmNodes, inside_allocation
from trainctl.protocol import Env
from trainctl.recovery import placement
from trainctl.recovery.journal import Journal
from trainctl.spec import JobSpec
from trainctl.state import JobRecord, NodeRecord, NodeState

LEFTOVER_WAIT_S = 15.0
"""How long a dead controller's agents get to tear their nodes down by themselves (they do
when its connection drops); what is left after that is killed."""


@dataclasses.dataclass
class Binding:
    """Where a controller runs its nodes, and what it does when it ends."""

    scheduler: NodeScheduler
    rdzv_host: str = "127.0.0.1"
    node_addr: str = ""
    """The address every node is reached at ('' when each node has its own)."""
    restart_count: int | None = None
    """The scheduler's requeue count (Slurm's SLURM_RESTART_COUNT; None on a first run)."""
    after_run: Callable[[ExitCode, JobSpec, Journal, Callable[[str], None]], None] = (
        lambda code, spec, journal, warn: None
    )


def local() -> Binding:
    """The local scheduler's binding: simulated nodes on this host, all at 127.0.0.1 (so the
    rendezvous never depends on the host name resolving)."""
    return Binding(LocalScheduler(sys.executable), node_addr="127.0.0.1")


def bind(
    record: JobRecord,
    environ: Mapping[str, str] = os.environ,
    spec: JobSpec | None = None,
    blocklist: Mapping[str, object] | None = None,
) -> Binding:
    """The binding for a controller of `record` started in this process's environment.

    Inside the job's Slurm allocation the allocation's nodes become the job's (an excluded
    node outside it stays listed, with why). A Ray job gets a new placement group without its
    blocklisted Ray nodes (`RAY_ADDRESS`, else the cluster it ran on).
    """
    if record.scheduler == "ray" and spec is not None:
        from trainctl.launch import ray_binding

        return ray_binding.resume_binding(record, spec, blocklist or {}, environ.get("RAY_ADDRESS"))
    if record.scheduler != "slurm" or not inside_allocation(environ):
        return local()
    client = SlurmClient()
    allocation = SlurmAllocation.from_env(client, environ)
    known = {node.name: node for node in record.nodes}
    record.nodes = [known.get(name) or NodeRecord(name=name) for name in allocation.nodes] + [
        n for n in record.nodes if n.name not in allocation.nodes and n.state == NodeState.EXCLUDED
    ]
    record.scheduler_job_id = allocation.slurm_job_id

    def after_run(
        code: ExitCode, spec: JobSpec, journal: Journal, warn: Callable[[str], None]
    ) -> None:
        decision = placement.after_run(
            code, journal.load_blocklist(), time.time(), spec.slurm.drain_blamed_nodes
        )
        if decision.action is placement.AfterRunAction.NONE:
            return
        if decision.drain:
            for name in decision.excluded:
                try:
                    client.drain(name, f"trainctl job {record.job_id}: {record.reason}"[:200])
                except SlurmError as error:
                    warn(f"could not drain {name}: {error}")
        journal.event(Requeued(excluded=list(decision.excluded)), decision.reason)
        if decision.action is placement.AfterRunAction.REQUEUE_EXCLUDING:
            client.requeue_excluding(allocation.slurm_job_id, decision.excluded)
        else:
            client.requeue(allocation.slurm_job_id)

    return Binding(
        SlurmNodes(allocation.slurm_job_id, sys.executable, client),
        rdzv_host=allocation.address,
        restart_count=allocation.restart_count,
        after_run=after_run,
    )


def check_request(script: SbatchScript) -> None:
    """Ask Slurm whether it could ever run the script (`sbatch --test-only`; nothing is
    submitted or written). Raises `SlurmRequestRefused` (exit 2) if it could not."""
    SlurmClient().test_submit(script)


def submit(script: SbatchScript) -> str:
    """Submit a rendered batch script to Slurm; returns the Slurm job id."""
    return SlurmClient().submit(script)


def cancel(record: JobRecord) -> str | None:
    """End the job in its scheduler too (Slurm: `scancel`); what was done, or None (local
    jobs: the controller stopped every process itself). Raises `SlurmError`."""
    if record.scheduler != "slurm" or not record.scheduler_job_id:
        return None
    SlurmClient().cancel(record.scheduler_job_id)
    return f"scancel {record.scheduler_job_id}"


def describe(record: JobRecord) -> dict[str, Any] | None:
    """The job as its scheduler sees it (Slurm: `squeue`, read through one table; Ray: its
    placement group); None for jobs of the local scheduler."""
    if record.scheduler == "ray" and record.scheduler_job_id:
        from trainctl.launch import ray_binding

        return ray_binding.describe(record)
    if record.scheduler != "slurm" or not record.scheduler_job_id:
        return None
    try:
        view = SlurmClient().job_view(record.scheduler_job_id)
    except SlurmError as error:
        return {"state": None, "describe": f"Slurm unavailable: {error}"}
    if view is None:
        return {"state": None, "describe": "Slurm no longer knows the job (it ended a while ago)"}
    return {
        "state": view.state,
        "reason": view.reason,
        "meaning": view.meaning.summary,
        "active": view.meaning.active,
        "nodes": list(view.nodes),
        "excluded": list(view.exc_nodes),
        "restart_count": view.restart_count,
        "describe": view.describe(),
    }


def clear_leftovers(job_id: str, warn: Callable[[str], None]) -> None:
    """Wait for a dead controller's processes on this host to go; kill what stays."""
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while time.monotonic() < deadline:
        if not proctree.tagged(Env.JOB_ID, job_id):
            return
        time.sleep(0.1)
    left = proctree.tagged(Env.JOB_ID, job_id)
    warn(f"killing {len(left)} process(es) left by the previous controller")
    proctree.kill_tree(left, grace_s=2.0)
