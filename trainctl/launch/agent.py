"""The node agent: one per node for the whole job, owns everything that runs there.

It connects to the controller (one connection per node) and stays up across attempts, so a
relaunch costs no agent start-up and a spare node waits on standby with its health already
known. Per attempt (a ``launch`` message naming the attempt's plan) it runs the pre-rendezvous
health gate and reports its ``verdict`` (an UNHEALTHY node never starts torchrun), starts
torchrun with the node's planned argv and environment — through a *warm* torchrun that
imported torch ahead of time (`trainctl.launch.warmrun`) — re-probes every
``health.probe_interval_s``, relays its workers' heartbeats in batches (every step's times kept,
for straggler detection), dumps its workers' stacks on ``dump_stacks`` and reports torchrun's
exit with any error files. ``stop`` ends the attempt (``mode: kill`` after a failure: SIGKILL at
once, nothing to save; ``graceful``: SIGTERM, then SIGKILL after the grace, so workers can
checkpoint); ``shutdown`` or a lost controller ends the agent. torchrun's workers live in their
own sessions, so the agent is a child subreaper and walks /proc to find them.

Run as ``python -m trainctl.launch.agent NODE CONTROL_ENDPOINT``.
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
from typing import IO, Any

from trainctl.health.gate import GateConfig, GateResult, NodeProber
from trainctl.health.verdict import GIB, Verdict
from trainctl.launch import proctree, stacks
from trainctl.launch.control import ControlClient, WorkerChannel, worker_socket_address
from trainctl.launch.plan import GatePlan, LaunchPlan, NodePlan
from trainctl.launch.zygote import ZYGOTE_ENV

PROGRESS_BATCH_S = 0.25
"""Heartbeats are forwarded at most this often (one message per node, not per worker)."""
MAX_SAMPLES_PER_RANK = 256
"""Per-step samples kept per rank between two forwards (bounded if the controller stalls)."""
TORCHRUN_MODULE = ("-m", "torch.distributed.run")


def gate_config(gate: GatePlan, rdzv_endpoint: str | None) -> GateConfig:
    """The health gate: the plan's paths and limits, and the rendezvous endpoint."""
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    return GateConfig(
        paths=gate.paths,
        min_free_disk_bytes=int(gate.min_free_disk_gb * GIB),
        rendezvous=(host, int(port)) if port.isdigit() and int(port) > 0 else None,
        require_nvml=gate.require_nvml,
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


class WarmTorchrun:
    """One `trainctl.launch.warmrun` process, importing torch until it is handed an argv."""

    def __init__(self, python: str, env: dict[str, str], log: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            [python, "-m", "trainctl.launch.warmrun"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.process.stdin is not None
        request = json.dumps({"argv": argv, "env": env}) + "\n"
        self.process.stdin.write(request.encode())
        self.process.stdin.close()
        return self.process

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Attempt:
    """What the agent holds for the attempt it is running."""

    def __init__(self, plan: LaunchPlan, node: NodePlan) -> None:
        self.plan = plan
        self.node = node
        self.workers = WorkerChannel(worker_socket_address(plan.job_id, plan.attempt, node.name))
        self.torchrun: subprocess.Popen[bytes] | None = None
        self.stop: tuple[str, str] | None = None
        """(reason, mode) once the controller asked this attempt to stop."""
        self.stacks_dir = Path(node.error_dir).parent / f"{node.name}-stacks"
        self.grace_s = float(node.env_dict().get("TRAINCTL_STOP_GRACE_S", "5"))


class Agent:
    def __init__(self, node: str, control_endpoint: str, python: str = sys.executable) -> None:
        self.name = node
        self.python = python
        self.control = ControlClient(control_endpoint, node)
        self.attempt: Attempt | None = None
        self.quit_reason: str | None = None
        self.prober: NodeProber | None = None
        self._gate_key: tuple[Any, ...] | None = None
        self._probing_done = threading.Event()
        self._probe_thread: threading.Thread | None = None
        self._warm: WarmTorchrun | None = None
        self._log: IO[bytes] | None = None
        self.zygote: subprocess.Popen[bytes] | None = None
        self.zygote_address = (
            f"@trainctl/zygote/{os.environ.get('TRAINCTL_JOB_ID', 'job')}/{node}/{os.getpid()}"
        )

    def send(self, message_type: str, **fields: Any) -> None:
        attempt = self.attempt.plan.attempt if self.attempt is not None else None
        self.control.send(
            {
                "node": self.name,
                "time": time.time(),
                "attempt": attempt,
                **fields,
                "type": message_type,
            }
        )

    # -- health ------------------------------------------------------------------------------
    def _prober_for(self, gate: GatePlan, rdzv_endpoint: str | None) -> NodeProber:
        key = (gate, rdzv_endpoint)
        if self.prober is None or self._gate_key != key:
            if self.prober is not None:
                self.prober.close()
            self.prober = NodeProber(gate_config(gate, rdzv_endpoint))
            self._gate_key = key
        return self.prober

    def probe(self, phase: str, gate: GatePlan, rdzv_endpoint: str | None) -> GateResult:
        """Probe now and report the verdict to the controller (``verdict`` message)."""
        result = self._prober_for(gate, rdzv_endpoint).probe()
        record = result.record(self.name, phase=phase).to_dict()
        self.send("verdict", phase=phase, record=record)
        return result

    def _probe_periodically(self, attempt: Attempt) -> None:
        interval = attempt.plan.gate.probe_interval_s
        while not self._probing_done.wait(interval):
            try:
                self.probe("running", attempt.plan.gate, attempt.plan.rdzv_endpoint)
            except Exception as error:  # a probe bug must not kill the node's training
                self.send(
                    "event",
                    kind="probe_error",
                    message=f"{self.name}: health probe failed: {error!r}",
                )

    def start_probing(self, attempt: Attempt) -> None:
        self._probing_done.clear()
        if attempt.plan.gate.probe_interval_s > 0:
            self._probe_thread = threading.Thread(
                target=self._probe_periodically, args=(attempt,), name="health-probe", daemon=True
            )
            self._probe_thread.start()

    def stop_probing(self) -> None:
        self._probing_done.set()
        if self._probe_thread is not None:
            self._probe_thread.join(timeout=10)
            self._probe_thread = None

    # -- stacks ------------------------------------------------------------------------------
    def dump_stacks(self) -> None:
        """Dump every worker's Python stacks (in parallel) and send them to the controller."""
        if self.attempt is None:
            self.send("stacks", dumps=[], duration_s=0.0)
            return
        started = time.monotonic()
        workers = stacks.find_workers(os.getpid())
        stacks_dir = self.attempt.stacks_dir
        dumps: list[dict[str, Any]] = []
        if workers:
            with ThreadPoolExecutor(max_workers=len(workers)) as pool:
                dumps = list(pool.map(lambda w: stacks.dump_worker(w, stacks_dir), workers))
        self.send("stacks", dumps=dumps, duration_s=time.monotonic() - started)

    # -- torchrun ----------------------------------------------------------------------------
    def _log_file(self, path: str) -> IO[bytes]:
        if self._log is None or self._log.name != path:
            if self._log is not None:
                self._log.close()
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the agent
        return self._log

    def start_zygote(self, log_path: str) -> None:
        """Start the node's warm-worker zygote (once; again if it died)."""
        if os.environ.get("TRAINCTL_WARM_WORKERS") != "1":
            return
        if self.zygote is None or self.zygote.poll() is not None:
            self.zygote = subprocess.Popen(
                [self.python, "-m", "trainctl.launch.zygote", self.zygote_address],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file(log_path),
                stderr=subprocess.STDOUT,
            )

    def warm_up(self, log_path: str) -> None:
        """Have a torchrun importing torch now, ready for the next attempt."""
        if self._warm is None or self._warm.process.poll() is not None:
            self._warm = WarmTorchrun(self.python, dict(os.environ), self._log_file(log_path))

    def start_torchrun(self, attempt: Attempt) -> None:
        node = attempt.node
        env = node.env_dict()
        env["TRAINCTL_AGENT_SOCKET"] = attempt.workers.address
        if self.zygote is not None and self.zygote.poll() is None:
            env[ZYGOTE_ENV] = self.zygote_address
        env[stacks.STACKS_DIR_ENV] = str(attempt.stacks_dir)
        log = self._log_file(node.log_path)
        Path(node.error_dir).mkdir(parents=True, exist_ok=True)
        log.write(f"--- attempt {attempt.plan.attempt} on {node.name}\n".encode())
        argv = list(node.argv)
        if len(argv) > 3 and tuple(argv[1:3]) == TORCHRUN_MODULE and self._warm is not None:
            warm, self._warm = self._warm, None
            attempt.torchrun = warm.start(argv[3:], env)
        else:
            attempt.torchrun = subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.send("started", pid=os.getpid(), torchrun_pid=attempt.torchrun.pid)

    # -- control -----------------------------------------------------------------------------
    def _handle_control(self) -> None:
        while not self.control.inbox.empty():
            message = self.control.inbox.get_nowait()
            kind = message.get("type")
            if kind == "launch" and self.attempt is None:
                plan = LaunchPlan.from_json(json.loads(Path(str(message["plan"])).read_text()))
                node = next(n for n in plan.nodes if n.name == self.name)
                self.start_zygote(node.log_path)
                self.attempt = Attempt(plan, node)
            elif kind == "stop" and self.attempt is not None and self.attempt.stop is None:
                self.attempt.stop = (
                    str(message.get("reason", "stop requested")),
                    str(message.get("mode", "graceful")),
                )
            elif kind == "probe":
                gate = GatePlan(**{**message["gate"], "paths": tuple(message["gate"]["paths"])})
                self.probe(str(message.get("phase", "standby")), gate, message.get("rdzv"))
            elif kind == "warm_up":
                self.warm_up(str(message["log_path"]))
            elif kind == "shutdown":
                self.quit_reason = str(message.get("reason", "shutdown"))
            elif kind == "disconnected":
                self.quit_reason = "controller connection lost"
            elif kind == "dump_stacks":
                self.dump_stacks()
        if self.quit_reason is not None and self.attempt is not None and self.attempt.stop is None:
            self.attempt.stop = (self.quit_reason, "kill")

    def _forward_progress(self, attempt: Attempt, pending: dict[str, Any]) -> None:
        """Fold worker heartbeats into `pending`: per rank the latest heartbeat, plus
        ``samples`` [step, step_time, busy_time] for every step since the last forward."""
        for message in attempt.workers.drain():
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
        """Serve the controller until it says shutdown or goes away."""
        self.send("hello", pid=os.getpid())
        log_path = os.environ.get("TRAINCTL_AGENT_LOG")
        if log_path:
            self.start_zygote(log_path)
        while self.quit_reason is None:
            self._handle_control()
            if self.attempt is not None:
                try:
                    self.run_attempt(self.attempt)
                finally:
                    self.attempt.workers.close()
                    self.attempt = None
            else:
                time.sleep(0.02)
        return 0

    def run_attempt(self, attempt: Attempt) -> None:
        plan = attempt.plan
        if self.probe("preflight", plan.gate, plan.rdzv_endpoint).verdict.status is (
            Verdict.UNHEALTHY
        ):
            # Never join the rendezvous; stay connected (so the controller reads the verdict
            # before it sees this node go) until it says stop or goes away.
            while attempt.stop is None:
                time.sleep(0.05)
                self._handle_control()
            self.send("exit", code=0, stopped=True, reason=attempt.stop[0], errors=[])
            return
        self.start_torchrun(attempt)
        self.start_probing(attempt)
        try:
            self._watch(attempt)
        finally:
            self.stop_probing()

    def _watch(self, attempt: Attempt) -> None:
        torchrun = attempt.torchrun
        assert torchrun is not None
        pending: dict[str, Any] = {}
        last_flush = 0.0
        warmed = False
        while True:
            self._handle_control()
            if attempt.stop is not None:
                self.shutdown(attempt, *attempt.stop)
                return
            select.select([attempt.workers], [], [], 0.1)
            self._forward_progress(attempt, pending)
            now = time.monotonic()
            if pending and now - last_flush >= PROGRESS_BATCH_S:
                self.send("progress", ranks=pending)
                pending = {}
                last_flush = now
                if not warmed:
                    # Training runs: prepare the next attempt's torchrun now, off the
                    # critical path of a relaunch.
                    self.warm_up(attempt.node.log_path)
                    warmed = True
            code = torchrun.poll()
            if code is not None:
                self._forward_progress(attempt, pending)
                if pending:
                    self.send("progress", ranks=pending)
                leftovers = proctree.kill_tree(
                    self._attempt_processes(), grace_s=1.0, keep_reaped=[torchrun.pid]
                )
                self.send(
                    "exit",
                    code=code,
                    errors=collect_error_files(attempt.node.error_dir),
                    killed_leftovers=len(leftovers),
                )
                return

    def _attempt_processes(self) -> list[int]:
        """Every descendant except what waits for the next attempt: the warm torchrun and the
        zygote itself (its children are this attempt's workers)."""
        spare: set[int] = set()
        if self._warm is not None:
            spare |= set(proctree.descendants(self._warm.process.pid)) | {self._warm.process.pid}
        if self.zygote is not None:
            spare.add(self.zygote.pid)
        return [pid for pid in proctree.descendants(os.getpid()) if pid not in spare]

    def shutdown(self, attempt: Attempt, reason: str, mode: str) -> None:
        """Stop torchrun and every descendant: SIGKILL at once (``kill``), or SIGTERM, the
        grace, then SIGKILL (``graceful``: workers may checkpoint)."""
        torchrun = attempt.torchrun
        assert torchrun is not None
        keep = [torchrun.pid]
        pids = self._attempt_processes()
        if mode == "kill":
            proctree.signal_all(pids, signal.SIGKILL)
            proctree.kill_tree(self._attempt_processes(), 1.0, keep_reaped=keep)
        else:
            proctree.kill_tree(pids, attempt.grace_s, keep_reaped=keep)
        code = torchrun.wait()
        self.send(
            "exit",
            code=code,
            stopped=True,
            reason=reason,
            errors=collect_error_files(attempt.node.error_dir),
        )

    def close(self) -> None:
        self.stop_probing()
        if self.prober is not None:
            self.prober.close()
        if self._warm is not None:
            self._warm.discard()
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.kill()
            self.zygote.wait()
        proctree.kill_tree(proctree.descendants(os.getpid()), 1.0)
        if self._log is not None:
            self._log.close()


def main(argv: list[str]) -> int:
    node_name, control_endpoint = argv
    proctree.become_subreaper()
    agent = Agent(node_name, control_endpoint)

    def on_signal(signum: int, _frame: object) -> None:
        agent.quit_reason = agent.quit_reason or f"agent received {signal.Signals(signum).name}"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Slurm's `scancel --signal=USR1 --full` reaches every step's task, agents included: the
    # controller (the batch process) gets it too and stops the attempt in order, with a
    # checkpoint. The agent must not die of it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        return agent.run()
    finally:
        agent.close()
        with contextlib.suppress(Exception):
            agent.control.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
