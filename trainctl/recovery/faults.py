"""Fault injection for tests and demos (`trainctl launch --fault`, local scheduler only).

Each fault fires once, when the job first reports its step: ``kill-node`` kills every process
of the node with SIGKILL (as a dead host would), ``kill-worker`` SIGKILLs one worker,
``hang`` SIGSTOPs one worker, ``nvml-xid`` adds an XID 79 (GPU fallen off the bus) to the node's
fake NVML file (tests/fakenvml; the node needs ``node_env.<node>.FAKE_NVML_FILE``), and
``storage-outage`` makes every checkpoint storage request fail for ``for`` seconds (through the
faults directory the storage layer watches, `trainctl.checkpoint.storage.InjectedOutage`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from trainctl.checkpoint.storage import FAULTS_DIR_ENV, OUTAGE_FILE
from trainctl.errors import UserError
from trainctl.launch.local import LocalScheduler
from trainctl.spec import FaultSpec, JobSpec

__all__ = ["FAULTS_DIR_ENV", "FaultInjector", "check_faults"]


def check_faults(spec: JobSpec, scheduler: str) -> None:
    """Refuse faults this job cannot inject, before anything starts."""
    if spec.faults and scheduler != "local":
        raise UserError(
            "fault injection works with the local scheduler only",
            where="--fault",
            value=spec.faults[0].describe(),
            fix="drop --fault, or run with the local scheduler",
        )
    for fault in spec.faults:
        if fault.kind == "nvml-xid":
            node = fault.node or ""
            if "FAKE_NVML_FILE" not in spec.node_env.get(node, {}):
                raise UserError(
                    "an nvml-xid fault needs the fake NVML on that node",
                    where="--fault",
                    value=fault.describe(),
                    fix=f"set node_env.{node}.FAKE_NVML_FILE in the recipe (see tests/fakenvml)",
                )


class FaultInjector:
    def __init__(
        self,
        spec: JobSpec,
        job_id: str,
        scheduler: LocalScheduler,
        faults_dir: Path,
        fired: list[str],
    ) -> None:
        self.spec = spec
        self.job_id = job_id
        self.scheduler = scheduler
        self.faults_dir = faults_dir
        self.pending = [f for f in spec.faults if f.describe() not in fired]
        self._outage_until: float | None = None

    def due(self, step: int) -> list[FaultSpec]:
        """Faults whose step was reached; they are removed from `pending`."""
        ready = [f for f in self.pending if step >= f.step]
        self.pending = [f for f in self.pending if f not in ready]
        return ready

    def fire(self, fault: FaultSpec) -> str:
        """Inject `fault`; returns what was done, for the event."""
        node = fault.node or ""
        if fault.kind == "kill-node":
            pids = self.scheduler.node_processes(self.job_id, node)
            self.scheduler.kill_node(self.job_id, node)
            return f"SIGKILL to every process of {node} ({len(pids)})"
        if fault.kind in ("kill-worker", "hang"):
            workers = self.scheduler.worker_pids(self.job_id, node, local_rank=0)
            if not workers:
                return f"no worker found on {node}"
            sig = signal.SIGKILL if fault.kind == "kill-worker" else signal.SIGSTOP
            os.kill(workers[0], sig)
            return f"{sig.name} to worker pid {workers[0]} (local rank 0) on {node}"
        if fault.kind == "nvml-xid":
            path = Path(self.spec.node_env[node]["FAKE_NVML_FILE"])
            with path.open("a") as handle:
                handle.write("\ngpu.0.xid=79\n")
            return f"XID 79 on GPU 0 of {node} (fake NVML {path})"
        if fault.kind == "storage-outage":
            self.faults_dir.mkdir(parents=True, exist_ok=True)
            until = time.time() + fault.duration_s
            (self.faults_dir / OUTAGE_FILE).write_text(f"{until}\n")
            self._outage_until = until
            return f"checkpoint storage refuses every request for {fault.duration_s:g} s"
        raise AssertionError(f"unknown fault {fault.kind}")

    def tick(self) -> None:
        """Lift an expired outage."""
        if self._outage_until is not None and time.time() >= self._outage_until:
            (self.faults_dir / OUTAGE_FILE).unlink(missing_ok=True)
            self._outage_until = None
