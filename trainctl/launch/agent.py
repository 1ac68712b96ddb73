"""The node agent: one per node, owns everything that runs there.

It connects to the controller (one connection per node), runs the pre-rendezvous health gate
and reports its ``verdict`` (an UNHEALTHY node never starts torchrun: it waits for the
controller's ``stop``), starts torchrun with the node's planned argv and environment, re-probes
every ``health.probe_interval_s`` (a background thread; NVML stays open so XIDs between probes
are seen), relays its workers' heartbeats in batches (every step's times kept, for straggler
detection), dumps its workers' stacks on ``dump_stacks``, reports torchrun's exit with any
error files, and on ``stop`` (or when the controller goes away) tears the node's whole process
tree down: torchrun's workers live in their own sessions, so the agent is a child subreaper and
walks /proc to find them.

Run as ``python -m trainctl.launch.agent PLAN.json NODE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainctl.health.gate import GateConfig, GateResult, NodeProber
from trainctl.health.verdict import GIB, Verdict
from trainctl.launch import proctree, stacks
from trainctl.launch.control import ControlClient, WorkerChannel, worker_socket_address
from trainctl.launch.plan import LaunchPlan, NodePlan

PROGRESS_BATCH_S = 0.25
"""Heartbeats are forwarded at most this often (one message per node, not per worker)."""
MAX_SAMPLES_PER_RANK = 256
"""Per-step samples kept per rank between two forwards (bounded if the controller stalls)."""


def gate_config(plan: LaunchPlan) -> GateConfig:
    """The health gate for this plan: its paths and limits, and the rendezvous endpoint."""
    host, _, port = plan.rdzv_endpoint.rpartition(":")
    return GateConfig(
        paths=plan.gate.paths,
        min_free_disk_bytes=int(plan.gate.min_free_disk_gb * GIB),
        rendezvous=(host, int(port)) if port.isdigit() and int(port) > 0 else None,
        require_nvml=plan.gate.require_nvml,
    )


def collect_error_files(error_dir: str) -> list[dict[str, Any]]:
    """The error.json files torchrun's @record wrote under `error_dir`, oldest first.

    Only workers that died with a Python exception write one; a SIGKILLed worker writes none.
    """
    errors: list[dict[str, Any]] = []
    for path in Path(error_dir).rglob("error.json"):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        message = raw.get("message", {})
        if isinstance(message, dict):
            text = str(message.get("message", ""))
            extra = message.get("extraInfo", {})
            timestamp = float(extra.get("timestamp", 0) or 0)
        else:
            text, timestamp = str(message), 0.0
        errors.append(
            {
                "file": str(path),
                "message": text,
                "timestamp": timestamp,
                "local_rank": path.parent.name,
            }
        )
    errors.sort(key=lambda e: float(e["timestamp"]))
    return errors


class Agent:
    def __init__(self, plan: LaunchPlan, node: NodePlan, control_endpoint: str) -> None:
        self.plan = plan
        self.node = node
        self.control = ControlClient(control_endpoint, node.name)
        self.worker_address = worker_socket_address(plan.job_id, plan.attempt, node.name)
        self.workers = WorkerChannel(self.worker_address)
        self.torchrun: subprocess.Popen[bytes] | None = None
        self.stop_reason: str | None = None
        self.grace_s = float(node.env_dict().get("TRAINCTL_STOP_GRACE_S", "5"))
        self.stacks_dir = Path(node.error_dir).parent / f"{node.name}-stacks"
        self.prober: NodeProber | None = None
        self._probing_done = threading.Event()
        self._probe_thread: threading.Thread | None = None

    def send(self, message_type: str, **fields: Any) -> None:
        self.control.send(
            {"node": self.node.name, "time": time.time(), **fields, "type": message_type}
        )

    # -- health ------------------------------------------------------------------------------
    def probe(self, phase: str) -> GateResult:
        """Probe now and report the verdict to the controller (``verdict`` message)."""
        assert self.prober is not None
        result = self.prober.probe()
        record = result.record(self.node.name, phase=phase).to_dict()
        self.send("verdict", phase=phase, record=record)
        return result

    def _probe_periodically(self) -> None:
        interval = self.plan.gate.probe_interval_s
        while not self._probing_done.wait(interval):
            try:
                self.probe("running")
            except Exception as error:  # a probe bug must not kill the node's training
                self.send(
                    "event",
                    kind="probe_error",
                    message=f"{self.node.name}: health probe failed: {error!r}",
                )

    def start_probing(self) -> None:
        if self.plan.gate.probe_interval_s > 0:
            self._probe_thread = threading.Thread(
                target=self._probe_periodically, name="health-probe", daemon=True
            )
            self._probe_thread.start()

    def stop_probing(self) -> None:
        self._probing_done.set()
        if self._probe_thread is not None:
            self._probe_thread.join(timeout=10)
        if self.prober is not None:
            self.prober.close()

    def wait_for_stop(self) -> int:
        """After an UNHEALTHY gate: stay connected (so the controller reads the verdict before
        it sees this agent go) until it says stop or goes away."""
        while self.stop_reason is None:
            time.sleep(0.1)
            self._handle_control()
        return 0

    # -- stacks ------------------------------------------------------------------------------
    def dump_stacks(self) -> None:
        """Dump every worker's Python stacks (in parallel) and send them to the controller."""
        started = time.monotonic()
        workers = stacks.find_workers(os.getpid())
        dumps: list[dict[str, Any]] = []
        if workers:
            with ThreadPoolExecutor(max_workers=len(workers)) as pool:
                dumps = list(pool.map(lambda w: stacks.dump_worker(w, self.stacks_dir), workers))
        self.send("stacks", dumps=dumps, duration_s=time.monotonic() - started)

    # -- torchrun ----------------------------------------------------------------------------
    def start_torchrun(self) -> None:
        env = dict(os.environ)
        env.update(self.node.env_dict())
        env["TRAINCTL_AGENT_SOCKET"] = self.worker_address
        env[stacks.STACKS_DIR_ENV] = str(self.stacks_dir)
        Path(self.node.log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.node.error_dir).mkdir(parents=True, exist_ok=True)
        with open(self.node.log_path, "ab") as log:
            log.write(f"--- attempt {self.plan.attempt} on {self.node.name}\n".encode())
            log.flush()
            self.torchrun = subprocess.Popen(
                list(self.node.argv),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.send("started", pid=os.getpid(), torchrun_pid=self.torchrun.pid)

    def _handle_control(self) -> None:
        while not self.control.inbox.empty():
            message = self.control.inbox.get_nowait()
            if message.get("type") == "stop" and self.stop_reason is None:
                self.stop_reason = str(message.get("reason", "stop requested"))
            elif message.get("type") == "disconnected" and self.stop_reason is None:
                self.stop_reason = "controller connection lost"
            elif message.get("type") == "dump_stacks":
                self.dump_stacks()

    def _forward_progress(self, pending: dict[str, Any]) -> None:
        """Fold worker heartbeats into `pending`: per rank the latest heartbeat, plus
        ``samples`` [step, step_time, busy_time] for every step since the last forward."""
        for message in self.workers.drain():
            kind = message.get("type", "progress")
            if kind == "progress":
                rank = str(message["rank"])
                samples = pending[rank]["samples"] if rank in pending else []
                sample = [message["step"], message.get("step_time"), message.get("busy_time")]
                samples = [*samples, sample][-MAX_SAMPLES_PER_RANK:]
                pending[rank] = {**message, "samples": samples}
            else:
                # results and worker events are rare and must not be coalesced
                self.send(kind, **{k: v for k, v in message.items() if k != "type"})

    def run(self) -> int:
        self.send("hello", pid=os.getpid(), attempt=self.plan.attempt)
        self.prober = NodeProber(gate_config(self.plan))
        if self.probe("preflight").verdict.status is Verdict.UNHEALTHY:
            return self.wait_for_stop()  # never join the rendezvous
        self.start_torchrun()
        self.start_probing()
        assert self.torchrun is not None
        pending: dict[str, Any] = {}
        last_flush = 0.0
        while True:
            self._handle_control()
            if self.stop_reason is not None:
                return self.shutdown(self.stop_reason)
            select.select([self.workers], [], [], 0.2)
            self._forward_progress(pending)
            now = time.monotonic()
            if pending and now - last_flush >= PROGRESS_BATCH_S:
                self.send("progress", ranks=pending)
                pending = {}
                last_flush = now
            code = self.torchrun.poll()
            if code is not None:
                self._forward_progress(pending)
                if pending:
                    self.send("progress", ranks=pending)
                leftovers = proctree.kill_tree(
                    proctree.descendants(os.getpid()), grace_s=1.0, keep_reaped=[self.torchrun.pid]
                )
                self.send(
                    "exit",
                    code=code,
                    errors=collect_error_files(self.node.error_dir),
                    killed_leftovers=len(leftovers),
                )
                return 0

    def shutdown(self, reason: str) -> int:
        """Stop torchrun and every descendant: SIGTERM, grace, SIGKILL."""
        assert self.torchrun is not None
        keep = [self.torchrun.pid]
        proctree.kill_tree(proctree.descendants(os.getpid()), self.grace_s, keep_reaped=keep)
        code = self.torchrun.wait()
        self.send(
            "exit",
            code=code,
            stopped=True,
            reason=reason,
            errors=collect_error_files(self.node.error_dir),
        )
        return 0


def main(argv: list[str]) -> int:
    plan_path, node_name, control_endpoint = argv
    plan = LaunchPlan.from_json(json.loads(Path(plan_path).read_text()))
    node = next(n for n in plan.nodes if n.name == node_name)
    proctree.become_subreaper()
    agent = Agent(plan, node, control_endpoint)

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop_reason = agent.stop_reason or f"agent received {signal.Signals(signum).name}"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return agent.run()
    finally:
        agent.stop_probing()
        agent.workers.close()
        with contextlib.suppress(Exception):
            agent.control.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
