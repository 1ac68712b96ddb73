"""What a node agent holds for one attempt (`Attempt`: its plan, workers' channel, torchrun,
and what its workers left when they ended), and the settings it derives from its plan and
environment (the health gate's, the liveness policy for its controller)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from trainctl.health import flight_recorder
from trainctl.health.gate import GateConfig
from trainctl.health.liveness import LivenessPolicy
from trainctl.health.readings import NvmlReading
from trainctl.health.verdict import GIB
from trainctl.launch import evidence, workers
from trainctl.launch.control_agent import WorkerChannel, worker_socket_address
from trainctl.launch.plan import LaunchPlan, NodePlan
from trainctl.launch.torchrun import ForkedTorchrun, collect_error_files
from trainctl.protocol import Env, ErrorFile, Exit, GatePlan, Stop


def gate_config(gate: GatePlan, rdzv_endpoint: str | None) -> GateConfig:
    """The health gate: the plan's paths and limits, and the rendezvous endpoint."""
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    return GateConfig(
        paths=gate.paths,
        min_free_disk_bytes=int(gate.min_free_disk_gb * GIB),
        rendezvous=(host, int(port)) if port.isdigit() and int(port) > 0 else None,
        require_nvml=gate.require_nvml,
    )


class Attempt:
    """What the agent holds for the attempt it is running."""

    def __init__(self, plan: LaunchPlan, node: NodePlan, worker_token: str) -> None:
        self.plan = plan
        self.node = node
        self.worker_token = worker_token
        self.workers = WorkerChannel(
            worker_socket_address(plan.job_id, plan.attempt, node.name), worker_token
        )
        self.torchrun: subprocess.Popen[bytes] | ForkedTorchrun | None = None
        self.stop: Stop | None = None
        """Set once the controller asked this attempt to stop."""
        self.stacks_dir = Path(node.error_dir).parent / f"{node.name}-stacks"
        self.server_dir = tempfile.mkdtemp(prefix="trainctl-w")
        """Where the workers serve torch's debug handlers (a short path: Unix socket names
        have 108 bytes; private: 0700)."""
        self.grace_s = float(node.env_dict().get(Env.STOP_GRACE_S, "5"))
        self.log_offset = 0
        """Where this attempt's output starts in the node log."""

    def worker_count(self, nvml: NvmlReading, environ: Mapping[str, str]) -> int:
        """This node's worker count: the plan's, or its visible GPUs (``gpu``/``auto``);
        0 for a plan without the flag (torchrun's default). Raises `WorkerCountError`."""
        requested = workers.requested_workers(self.node.argv)
        if requested is None:
            return 0
        gpus = workers.visible_gpus(nvml, {**environ, **self.node.env_dict()})
        return workers.workers_per_node(requested, gpus, self.node.name, nvml)

    def worker_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """What the agent adds for torchrun and the workers: the plan's environment, where
        to report, dump stacks and serve debug handlers, and NCCL's failure settings (the
        flight recorder dumping beside the stacks; how a failed collective ends a process),
        unless the recipe or the site set them."""
        env = self.node.env_dict()
        env[Env.AGENT_SOCKET] = self.workers.address
        env[Env.WORKER_TOKEN] = self.worker_token
        env[Env.STACKS_DIR] = str(self.stacks_dir)
        env[Env.WORKER_SERVER_DIR] = self.server_dir
        env.update(flight_recorder.worker_env(str(self.stacks_dir), {**environ, **env}))
        return env

    def exit(
        self,
        code: int,
        *,
        upto: int | None = None,
        stopped: bool = False,
        reason: str = "",
        killed_leftovers: int = 0,
    ) -> Exit:
        """The attempt's end for the controller: what its workers left (`failure`) and any
        flight recorder NCCL's watchdog dumped."""
        errors, crashes = self.failure(code, upto=upto)
        return Exit(
            code,
            stopped=stopped,
            reason=reason,
            errors=errors,
            killed_leftovers=killed_leftovers,
            crashes=crashes,
            flight_recorders=flight_recorder.watchdog_dumps(self.stacks_dir),
        )

    def close(self) -> None:
        """The attempt is over: its worker channel and debug sockets go."""
        self.workers.close()
        shutil.rmtree(self.server_dir, ignore_errors=True)

    def failure(
        self, code: int, upto: int | None = None
    ) -> tuple[tuple[ErrorFile, ...], tuple[str, ...]]:
        """What the attempt's workers left: error files (``@record``, trainctl.runtime) and
        tracebacks from plain scripts' stderr, and for a failed torchrun how workers died —
        read from the node log up to `upto` (where it stood when a stop came: what the stop
        itself killed is not a crash)."""
        errors = collect_error_files(self.node.error_dir)
        if code == 0:
            return errors, ()
        errors += evidence.traceback_errors(self.node.error_dir, errors)
        try:
            with open(self.node.log_path, "rb") as log:
                log.seek(self.log_offset)
                size = -1 if upto is None else max(0, upto - self.log_offset)
                torchrun_log = log.read(size).decode(errors="replace")
        except OSError:
            torchrun_log = ""
        return errors, evidence.crash_evidence(torchrun_log)


def liveness_policy(environ: Mapping[str, str]) -> LivenessPolicy:
    """How this agent judges its controller's heartbeats (`Env.LIVENESS`; defaults if unset)."""
    raw = environ.get(Env.LIVENESS)
    return LivenessPolicy(**json.loads(raw)) if raw else LivenessPolicy()
