"""Run a job's real controller against simulated node agents (tests and benchmarks only).

``python -m trainctl.sim.job --storage S --job-id J --nodes N [...]`` does what `trainctl
launch` does — a new record in the store, the lease, `run_job` (the same controller, policy,
journal and store) — with `trainctl.sim.scheduler.SimScheduler` as the scheduler: N agents
multiplexed in a few processes. ``--resume`` does what `trainctl resume` does
(`prepare_resume`) after a controller was killed. Exits with the controller's exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainctl.events import Event, JobCreated
from trainctl.lease import Lease
from trainctl.recipe import spec_to_yaml
from trainctl.recovery.journal import new_record
from trainctl.recovery.run import prepare_resume, run_job
from trainctl.schedulers import Binding
from trainctl.sim.scheduler import SimOptions, SimScheduler
from trainctl.spec import JobSpec
from trainctl.store import JobStore

SCRIPT = str(Path(__file__).resolve())
"""What the spec names as the script: never run (the agents are simulated)."""


def sim_spec(args: argparse.Namespace) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "sim",
            "script": SCRIPT,
            "nodes": args.nodes,
            "spare_nodes": args.spares,
            "min_nodes": args.min_nodes,
            "nproc_per_node": args.nproc,
            "max_steps": args.max_steps,
            "uses_runtime": False,
            "checkpoint": {"interval_steps": args.checkpoint_every},
            "health": {"probe_interval_s": 0},
            "launch": {"max_restarts": args.max_restarts},
        }
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainctl.sim.job")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--spares", type=int, default=2)
    parser.add_argument("--min-nodes", type=int, default=None)
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--max-restarts", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--faults", default="[]", help="JSON list of simulated faults")
    parser.add_argument("--fault-log", default="")
    parser.add_argument("--resume", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    store = JobStore(args.storage)
    store.check_root(True)
    scheduler = SimScheduler(
        SimOptions(
            processes=args.processes,
            step_s=args.step_s,
            checkpoint_every=args.checkpoint_every,
            faults=tuple(json.loads(args.faults)),
            fault_log=args.fault_log,
        )
    )
    binding = Binding(scheduler, node_addr="127.0.0.1")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.resume:
        resumed = prepare_resume(store, args.job_id, {}, say, say)
        if resumed.spec is None:
            return 0
        return int(run_job(resumed.spec, store, resumed.record, binding, resumed.lease, say, say))
    spec = sim_spec(args)
    now = time.time()
    record = new_record(args.job_id, spec, now)
    store.create(record, spec_to_yaml(spec))
    lease = Lease(store, args.job_id, spec.launch.lease_ttl_s)
    lease.acquire()
    store.append_event(
        args.job_id, Event(now, f"simulated: {spec.nodes} node(s)", JobCreated(target="sim"))
    )
    return int(run_job(spec, store, record, binding, lease, say, say))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
