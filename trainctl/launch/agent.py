"""The node agent: one per node for the whole job, owns everything that runs there.

It connects to the controller (one connection per node, every message carrying the job's token)
and stays up across attempts, so a relaunch costs no agent start-up and a spare node waits on
standby with its health already known. Per attempt (a `Launch` naming the attempt's plan) it
runs the pre-rendezvous health gate and reports its verdict (an UNHEALTHY node never starts
torchrun), starts torchrun with the node's planned argv and environment (forked from the node's
torchrun server, which imported torch once when the agent started: `trainctl.launch.torchrun`),
re-probes every ``health.probe_interval_s``, relays its workers' heartbeats in batches (every
step's times kept, for straggler detection), dumps its workers' stacks on `DumpStacks` and
reports torchrun's exit with any error files. `Stop` ends the attempt (``kill`` after a
failure: SIGKILL at once, nothing to save; ``graceful``: SIGTERM, then SIGKILL after the grace,
so workers can checkpoint); `Shutdown` or a lost controller ends the agent. torchrun's workers
live in their own sessions, so the agent is a child subreaper and walks /proc to find them.

Run as ``python -m trainctl.launch.agent NODE CONTROL_ENDPOINT`` with the token in
``TRAINCTL_CONTROL_TOKEN``.
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

from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.peer_wire import read_token
from trainctl.health.gate import GateResult, NodeProber
from trainctl.health.liveness import LivenessPolicy
from trainctl.health.verdict import Verdict
from trainctl.launch import proctree, stacks, workers
from trainctl.launch.control_agent import ControlClient
from trainctl.launch.gpu_sampler import GpuUsageSampler
from trainctl.launch.node_attempt import Attempt, gate_config, liveness_policy
from trainctl.launch.plan import LaunchPlan
from trainctl.launch.torchrun import ForkedTorchrun, TorchrunServer, can_warm_start
from trainctl.launch.workers import WorkerCountError
from trainctl.protocol import (
    Disconnected,
    DumpStacks,
    Env,
    ErrorFile,
    Exit,
    GatePlan,
    Heartbeat,
    Hello,
    Launch,
    Message,
    Probe,
    Progress,
    Shutdown,
    StacksReport,
    Started,
    Stop,
    VerdictReport,
    WarmUp,
    WorkerEvent,
    WorkerProgress,
    new_token,
)
from trainctl.secrets import write_private

PROGRESS_BATCH_S = 0.25
"""Heartbeats are forwarded at most this often (one message per node, not per worker)."""
PEER_TOKEN_NAME = "peer-read-token"
"""In the node's memory-tier directory: the workers' read token for peers' slots (0600)."""
MAX_SAMPLES_PER_RANK = 256
"""Per-step samples kept per rank between two forwards (bounded if the controller stalls)."""


class Agent:
    def __init__(
        self, node: str, control_endpoint: str, token: str, liveness: LivenessPolicy | None = None
    ) -> None:
        self.name = node
        self.python = sys.executable
        self.control = ControlClient(control_endpoint, node, token, liveness=liveness)
        # The node's memory tier: served to the peers' holders with the job's token.
        self.holder = Holder(
            os.environ.get(Env.JOB_ID, "job"), node, token, self.control.local_host
        )
        self._assemble = False
        self.worker_token = new_token()
        self.attempt: Attempt | None = None
        self._pending_launch: Launch | None = None
        self.quit_reason: str | None = None
        self.prober: NodeProber | None = None
        self.gpu_usage = GpuUsageSampler()
        self._gate_key: tuple[GatePlan, str | None] | None = None
        self._probing_done = threading.Event()
        self._probe_thread: threading.Thread | None = None
        self.torchruns: TorchrunServer | None = None
        """The node's torchrun server (`warm_up`): every attempt's torchrun is a fork of it."""
        self._log: IO[bytes] | None = None
        self.zygote: subprocess.Popen[bytes] | None = None
        self.progress_s = PROGRESS_BATCH_S
        """How often progress is forwarded (`Env.PROGRESS_INTERVAL`: longer for big jobs)."""
        self.zygote_address = (
            f"@trainctl/zygote/{os.environ.get(Env.JOB_ID, 'job')}/{node}/{os.getpid()}"
        )

    def send(self, message: Message) -> None:
        self.control.send(message, self.attempt.plan.attempt if self.attempt else None)

    # -- health ------------------------------------------------------------------------------
    def probe(self, phase: str, gate: GatePlan, rdzv_endpoint: str | None) -> GateResult:
        """Probe now and report the verdict, and how busy the GPUs are, to the controller."""
        if self.prober is None or self._gate_key != (gate, rdzv_endpoint):
            if self.prober is not None:
                self.prober.close()
            self.prober = NodeProber(gate_config(gate, rdzv_endpoint))
            self._gate_key = (gate, rdzv_endpoint)
        result = self.prober.probe()
        self.send(VerdictReport(phase, result.record(self.name, phase=phase).to_dict()))
        self.send(self.gpu_usage.sample(phase))
        return result

    def _probe_periodically(self, attempt: Attempt) -> None:
        interval = attempt.plan.gate.probe_interval_s
        while not self._probing_done.wait(interval):
            try:
                self.probe("running", attempt.plan.gate, attempt.plan.rdzv_endpoint)
            except Exception as error:  # a probe bug must not kill the node's training
                message = f"{self.name}: health probe failed: {error!r}"
                self.send(WorkerEvent("probe_error", message))

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
            self.send(StacksReport(()))
            return
        started = time.monotonic()
        found = stacks.find_workers(os.getpid())
        stacks_dir = self.attempt.stacks_dir
        server_dir = self.attempt.server_dir
        dumps = []
        if found:
            with ThreadPoolExecutor(max_workers=len(found)) as pool:
                dumps = list(
                    pool.map(
                        lambda w: stacks.dump_worker(w, stacks_dir, server_dir),
                        found,
                    )
                )
        self.send(StacksReport(tuple(dumps), time.monotonic() - started))

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
        if os.environ.get(Env.WARM_WORKERS) != "1":
            return
        if self.zygote is None or self.zygote.poll() is not None:
            self.zygote = subprocess.Popen(
                [self.python, "-m", "trainctl.launch.zygote", self.zygote_address],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file(log_path),
                stderr=subprocess.STDOUT,
            )

    def warm_up(self, log_path: str) -> None:
        """Have the node's torchrun server running (importing torch now, if it was not), so
        the next attempt's torchrun is a fork (started once; again if it died)."""
        if self.torchruns is None or not self.torchruns.alive():
            if self.torchruns is not None:
                self.torchruns.discard()
            self.torchruns = TorchrunServer(self.python, dict(os.environ), self._log_file(log_path))

    def _peer_token_file(self) -> str:
        """The workers' read token for peers' slots, in a file only this user reads (written
        at every start: the node's memory directory may have been cleared)."""
        path = Path(self.holder.root) / PEER_TOKEN_NAME
        write_private(path, read_token(self.holder.token))
        return str(path)

    def start_torchrun(self, attempt: Attempt, count: int = 0) -> None:
        node = attempt.node
        env = attempt.worker_env(os.environ)
        if self._assemble:  # the memory tier is on: restores read peers' slots with it
            env[Env.PEER_TOKEN_FILE] = self._peer_token_file()
        if self.zygote is not None and self.zygote.poll() is None:
            env[Env.ZYGOTE] = self.zygote_address
        log = self._log_file(node.log_path)
        Path(node.error_dir).mkdir(parents=True, exist_ok=True)
        log.write(f"--- attempt {attempt.plan.attempt} on {node.name}\n".encode())
        attempt.log_offset = log.tell()
        argv = workers.with_workers(node.argv, count) if count else list(node.argv)
        forked = None
        if can_warm_start(argv) and self.torchruns is not None and self.torchruns.alive():
            forked = self.torchruns.start(argv[3:], env, node.log_path)
        if forked is not None:
            attempt.torchrun = forked
        else:
            attempt.torchrun = subprocess.Popen(
                argv,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.send(Started(os.getpid(), attempt.torchrun.pid, count))

    # -- control -----------------------------------------------------------------------------
    def _launch(self, message: Launch) -> None:
        try:
            plan = LaunchPlan.from_json(json.loads(Path(message.plan).read_text()))
            node = next(n for n in plan.nodes if n.name == self.name)
        except (OSError, ValueError, StopIteration) as bad:
            error = ErrorFile(message.plan, f"trainctl agent: unreadable plan: {bad!r}")
            self.send(Exit(1, errors=(error,)))
            return
        self.start_zygote(node.log_path)
        self._assemble = bool(message.holders)
        if message.holders:
            self.holder.configure(
                PeerSet(plan.attempt, message.holders, message.replicas, message.slots)
            )
        self.attempt = Attempt(plan, node, self.worker_token)

    def _handle_control(self) -> None:
        while not self.control.inbox.empty():
            message = self.control.inbox.get_nowait()
            if isinstance(message, Launch):
                if self.attempt is None:
                    self._launch(message)
                else:  # still ending the last attempt: this one starts right after
                    self._pending_launch = message
            elif isinstance(message, Stop) and self.attempt and self.attempt.stop is None:
                self.attempt.stop = message
            elif isinstance(message, Probe):
                self.probe(message.phase, message.gate, message.rdzv)
            elif isinstance(message, WarmUp):
                self.warm_up(message.log_path)
            elif isinstance(message, Shutdown):
                self.quit_reason = message.reason
            elif isinstance(message, Disconnected):
                self.quit_reason = "controller connection lost"
            elif isinstance(message, DumpStacks):
                self.dump_stacks()
        silent = self.control.silent()
        if silent is not None and self.quit_reason is None:
            # A controller that stopped beating is as gone as a closed connection (a dead or
            # partitioned host sends no FIN): this node tears down what it runs.
            self.quit_reason = f"controller silent: {silent}"
            print(f"trainctl agent {self.name}: {self.quit_reason}", file=sys.stderr, flush=True)
        if self.quit_reason is not None and self.attempt is not None and self.attempt.stop is None:
            self.attempt.stop = Stop(self.quit_reason, "kill")

    def _forward_progress(self, attempt: Attempt, pending: dict[str, Heartbeat]) -> None:
        """Fold worker heartbeats into `pending`: per rank the latest heartbeat, plus the
        samples (step, step time, busy time) of every step since the last forward."""
        for message in attempt.workers.drain():
            if isinstance(message, WorkerProgress):
                rank = str(message.rank)
                earlier = pending[rank].samples if rank in pending else ()
                sample = (message.step, message.step_time, message.busy_time)
                pending[rank] = Heartbeat(
                    step=message.step,
                    time=message.time,
                    step_time=message.step_time,
                    busy_time=message.busy_time,
                    saving=message.saving,
                    samples=(*earlier, sample)[-MAX_SAMPLES_PER_RANK:],
                )
            else:
                self.send(message)  # results and worker events are rare: never coalesced

    def run(self) -> int:
        """Serve the controller until it says shutdown or goes away."""
        self.send(Hello(os.getpid(), holder=self.holder.endpoint))
        log_path = os.environ.get(Env.AGENT_LOG)
        if log_path:
            self.start_zygote(log_path)
            self.warm_up(log_path)  # the first attempt's torchrun is a fork too
        while self.quit_reason is None:
            self._handle_control()
            if self.attempt is not None:
                try:
                    self.run_attempt(self.attempt)
                finally:
                    self.attempt.close()
                    self.attempt = None
                pending, self._pending_launch = self._pending_launch, None
                if pending is not None and self.quit_reason is None:
                    self._launch(pending)
            else:
                time.sleep(0.02)
        return 0

    def run_attempt(self, attempt: Attempt) -> None:
        plan = attempt.plan
        result = self.probe("preflight", plan.gate, plan.rdzv_endpoint)
        verdict = result.verdict
        if verdict.status is Verdict.UNHEALTHY:
            # Never join the rendezvous; stay connected (so the controller reads the verdict
            # before it sees this node go) until it says stop or goes away.
            while attempt.stop is None:
                time.sleep(0.05)
                self._handle_control()
            self.send(Exit(0, stopped=True, reason=attempt.stop.reason))
            return
        try:
            count = attempt.worker_count(result.nvml, os.environ)
        except WorkerCountError as bad:
            self.send(Exit(1, errors=(ErrorFile("nproc_per_node", str(bad)),)))
            return
        if self._assemble:  # the step the workers restore, from this node's RAM and the peers'
            self._choose_memory_step()
        self.start_torchrun(attempt, count)
        self.start_probing(attempt)
        try:
            self._watch(attempt)
        finally:
            self.stop_probing()

    def _choose_memory_step(self) -> None:
        """Have the holder write ``restore/index.json`` (and ``status.json``, whose skipped
        copies the workers report) before torchrun starts; a failure leaves no index, and the
        workers restore durable storage."""
        try:
            assembly = self.holder.assemble()
        except Exception as error:  # the tier is an optimisation: never fail the attempt for it
            said = f"memory tier: no restore index ({error!r}); workers use durable storage"
        else:
            found = assembly.step is not None
            where = f"step {assembly.step} ({assembly.tier})" if found else "no step"
            said = f"memory tier: {where} in {assembly.seconds:.3f} s"
            said += f", {len(assembly.skipped)} skipped" if assembly.skipped else ""
        print(f"trainctl agent {self.name}: {said}", file=sys.stderr, flush=True)

    def _watch(self, attempt: Attempt) -> None:
        torchrun = attempt.torchrun
        assert torchrun is not None
        pending: dict[str, Heartbeat] = {}
        last_flush = 0.0
        warmed = False
        while True:
            self._handle_control()
            if attempt.stop is not None:
                self.shutdown(attempt, attempt.stop)
                return
            waits: list[Any] = [attempt.workers]
            if isinstance(torchrun, ForkedTorchrun) and not torchrun.server.closed:
                waits.append(torchrun.server)  # its exit wakes this loop at once
            select.select(waits, [], [], 0.1)
            self._forward_progress(attempt, pending)
            now = time.monotonic()
            if pending and now - last_flush >= self.progress_s:
                self.send(Progress(pending))
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
                    self.send(Progress(pending))
                leftovers = proctree.kill_tree(
                    self._attempt_processes(), grace_s=1.0, keep_reaped=[torchrun.pid]
                )
                self.send(attempt.exit(code, killed_leftovers=len(leftovers)))
                return

    def _attempt_processes(self) -> list[int]:
        """Every descendant except what serves every attempt: the torchrun server and the
        zygote themselves (their children are this attempt's torchrun and workers)."""
        spare: set[int] = set()
        if self.torchruns is not None:
            spare.add(self.torchruns.process.pid)
        if self.zygote is not None:
            spare.add(self.zygote.pid)
        return [pid for pid in proctree.descendants(os.getpid()) if pid not in spare]

    def shutdown(self, attempt: Attempt, stop: Stop) -> None:
        """Stop torchrun and every descendant: SIGKILL at once (``kill``), or SIGTERM, the
        grace, then SIGKILL (``graceful``: workers may checkpoint)."""
        torchrun = attempt.torchrun
        assert torchrun is not None
        keep = [torchrun.pid]
        stopped_at: int | None = None
        with contextlib.suppress(OSError):
            stopped_at = os.path.getsize(attempt.node.log_path)
        pids = self._attempt_processes()
        if stop.mode == "kill":
            proctree.signal_all(pids, signal.SIGKILL)
            proctree.kill_tree(self._attempt_processes(), 1.0, keep_reaped=keep)
        else:
            proctree.kill_tree(pids, attempt.grace_s, keep_reaped=keep)
        code = torchrun.wait()
        self.send(attempt.exit(code, upto=stopped_at, stopped=True, reason=stop.reason))

    def close(self) -> None:
        self.stop_probing()
        self.holder.close()
        if self.prober is not None:
            self.prober.close()
        self.gpu_usage.close()
        if self.torchruns is not None:
            self.torchruns.discard()
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.kill()
            self.zygote.wait()
        proctree.kill_tree(proctree.descendants(os.getpid()), 1.0)
        if self._log is not None:
            self._log.close()


def main(argv: list[str]) -> int:
    node_name, control_endpoint = argv
    proctree.become_subreaper()
    # Out of the environment before anything starts: torchrun and the workers inherit it, and
    # they get a token of their own (the worker token), not the job's.
    token = os.environ.pop(Env.CONTROL_TOKEN, "")
    agent = Agent(node_name, control_endpoint, token, liveness_policy(os.environ))
    agent.progress_s = float(os.environ.get(Env.PROGRESS_INTERVAL) or PROGRESS_BATCH_S)

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
