"""Many simulated node agents in one process, each on its own control connection.

For tests and benchmarks of the control plane at scale (`trainctl.sim`), not a user feature.
Each `SimAgent` speaks the real protocol (`trainctl.protocol`, the job's token) to the real
controller, as `trainctl.launch.agent` does: hello, health verdicts (preflight, standby
probes), heartbeats, `Started`, batched `Progress` per rank, checkpoint commits and restores
(worker events of node rank 0), stack dumps on request, `Exit` when stopped or finished, and
a result. There is no torch and no torchrun: training is a step clock (`step_s` a step).

One selectors loop serves every agent of the process. Commands come from the scheduler
(`trainctl.sim.scheduler`) on stdin, one JSON object a line; what happened to an agent goes
back on stdout. Faults fire when a node's clock reaches their step, once:

- ``kill``: the connection is reset and the agent is gone (a dead host);
- ``freeze``: the agent stops sending and reading, its connection stays open (a silent host);
- ``unhealthy``: a running probe reports UNHEALTHY;
- ``straggler``: the node's step times are reported `slow` times longer.

Run as ``python -m trainctl.sim.agents``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from trainctl.protocol import (
    CONTROLLER_MESSAGES,
    Beat,
    DumpStacks,
    Envelope,
    Exit,
    Heartbeat,
    Hello,
    Launch,
    Message,
    Probe,
    Progress,
    ProtocolError,
    Result,
    Shutdown,
    StackDump,
    StacksReport,
    Started,
    Stop,
    VerdictReport,
    WorkerEvent,
    decode_line,
    encode_line,
)

PROGRESS_BATCH_S = 0.25
"""As the real agent: heartbeats forwarded at most this often (unless the controller says
`progress_s`, from `Env.PROGRESS_INTERVAL`)."""
TICK_S = 0.01


def verdict_record(node: str, phase: str, healthy: bool) -> dict[str, Any]:
    """A `NodeVerdictRecord` document, as the real health gate writes it."""
    status, reason = ("OK", "simulated node") if healthy else ("UNHEALTHY", "simulated fault")
    return {
        "node": node,
        "phase": phase,
        "checked_at": time.time(),
        "status": status,
        "reason": reason,
        "evidence": {"simulated": True},
    }


def committed_file(log_path: str) -> Path:
    """Where the simulated job keeps its newest committed step (shared by the processes)."""
    return Path(log_path).parent.parent / "sim" / "committed"


class SimAgent:
    """One simulated node agent: its connection, its step clock, its faults."""

    def __init__(self, loop: Loop, node: str, endpoint: str, token: str, options: Any) -> None:
        self.loop = loop
        self.node = node
        self.token = token
        self.step_s = float(options.get("step_s", 0.1))
        self.checkpoint_every = int(options.get("checkpoint_every", 0))
        self.beat_s = float(options.get("beat_s", 0.25))
        self.progress_s = float(options.get("progress_s", PROGRESS_BATCH_S))
        self.faults: list[dict[str, Any]] = list(options.get("faults", ()))
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbuf = b""
        self.outbuf = b""
        self.frozen = False
        self.healthy = True
        self.slow = 1.0
        self.attempt: int | None = None
        self.plan: dict[str, Any] | None = None
        self.rank0 = False
        self.ranks: list[int] = []
        self.start_step = 0
        self.started_at = 0.0
        self.max_steps: int | None = None
        self.sent_step = 0
        self.next_beat = time.monotonic()
        self.next_progress = 0.0
        self.send(Hello(os.getpid()))

    # -- wire ---------------------------------------------------------------------------------
    def send(self, message: Message) -> None:
        if self.frozen:
            return
        envelope = Envelope(message, self.node, self.attempt, time.time())
        self.outbuf += encode_line(envelope, self.token)
        self.next_beat = time.monotonic() + self.beat_s  # as the real agent: it counts as one
        self.flush()

    def flush(self) -> None:
        if not self.outbuf or self.frozen:
            return
        try:
            sent = self.sock.send(self.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.gone(0, "connection lost")
            return
        self.outbuf = self.outbuf[sent:]

    def readable(self) -> None:
        if self.frozen:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.gone(0, "controller connection lost")
            return
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            if b'"type":"beat"' in line:
                continue  # the controller is alive; this simulation does not judge it
            try:
                message = decode_line(line, self.token, CONTROLLER_MESSAGES).message
            except ProtocolError as bad:
                print(f"sim agent {self.node}: dropped a line: {bad}", file=sys.stderr)
                continue
            self.handle(message)
            if self.node not in self.loop.agents:
                return

    # -- messages -----------------------------------------------------------------------------
    def handle(self, message: Message) -> None:
        if isinstance(message, Launch):
            self.launch(message.plan)
        elif isinstance(message, Stop):
            self.end_attempt(Exit(-9 if message.mode == "kill" else -15, True, message.reason))
        elif isinstance(message, Probe):
            self.send(VerdictReport(message.phase, verdict_record(self.node, message.phase, True)))
        elif isinstance(message, DumpStacks):
            dumps = tuple(
                StackDump(r, i, os.getpid(), "S", "simulated", f"step clock at {self.step()}")
                for i, r in enumerate(self.ranks)
            )
            self.send(StacksReport(dumps, 0.0))
        elif isinstance(message, Shutdown):
            self.gone(0, message.reason)

    def launch(self, plan_path: str) -> None:
        plan = self.loop.plan(plan_path)
        names = [n["name"] for n in plan["nodes"]]
        index = names.index(self.node)
        per_node = max(1, plan["world_size"] // max(1, len(names)))
        env = dict(plan["nodes"][index]["env"])
        self.attempt = plan["attempt"]
        self.plan = plan
        self.rank0 = index == 0
        self.ranks = list(range(index * per_node, (index + 1) * per_node))
        max_steps = env.get("TRAINCTL_MAX_STEPS")
        self.max_steps = int(max_steps) if max_steps else None
        self.send(VerdictReport("preflight", verdict_record(self.node, "preflight", True)))
        self.send(Started(os.getpid(), os.getpid(), per_node))
        committed = committed_file(plan["nodes"][index]["log_path"])
        self.start_step = int(committed.read_text()) if committed.exists() else 0
        if self.rank0 and self.start_step:
            self.worker_event("checkpoint_restored", {"step": self.start_step})
        self.started_at = time.monotonic()
        self.sent_step = self.start_step
        self.next_progress = self.started_at

    def end_attempt(self, exit_message: Exit) -> None:
        if self.plan is None:
            return
        self.send(exit_message)
        self.plan = None
        self.attempt = None

    def worker_event(self, kind: str, data: dict[str, Any]) -> None:
        self.send(WorkerEvent(kind, f"{kind} step {data['step']}", rank=0, data=data))

    def gone(self, code: int, why: str) -> None:
        """The agent ends (shutdown, lost controller, or killed)."""
        self.loop.remove(self, code)

    # -- the clock ----------------------------------------------------------------------------
    def step(self) -> int:
        done = int((time.monotonic() - self.started_at) / self.step_s)
        step = self.start_step + done
        return min(step, self.max_steps) if self.max_steps else step

    def tick(self, now: float) -> None:
        if self.frozen:
            return
        if now >= self.next_beat:
            self.send(Beat())
            self.next_beat = now + self.beat_s
        if self.plan is None or now < self.next_progress:
            return
        step = self.step()
        if step > self.sent_step:
            # As the real agent: the interval runs from the last line sent, so an attempt's
            # first step is reported when it happens, not an interval after the start.
            self.next_progress = now + self.progress_s
            self.progress(step)
        if self.plan is not None and self.max_steps and step >= self.max_steps:
            if self.rank0:
                digest = hashlib.sha256(f"sim:{self.max_steps}".encode()).hexdigest()
                self.send(Result(0, self.max_steps, digest))
            self.end_attempt(Exit(0))

    def progress(self, step: int) -> None:
        samples = tuple(
            (s, self.step_s * self.slow, self.step_s * 0.9)
            for s in range(self.sent_step + 1, step + 1)
        )[-16:]
        beat = Heartbeat(
            step, time.time(), self.step_s * self.slow, self.step_s * 0.9, False, samples
        )
        self.send(Progress({str(rank): beat for rank in self.ranks}))
        if self.rank0 and self.checkpoint_every:
            newest = step - step % self.checkpoint_every
            if newest > self.sent_step and newest > self.start_step:
                assert self.plan is not None
                committed = committed_file(self.plan["nodes"][0]["log_path"])
                committed.parent.mkdir(parents=True, exist_ok=True)
                (committed.parent / "committed.tmp").write_text(str(newest))
                os.replace(committed.parent / "committed.tmp", committed)
                data = {"step": newest, "world_size": len(self.plan["nodes"]) * len(self.ranks)}
                self.worker_event("checkpoint_committed", data)
        self.sent_step = step
        self.fire_faults(step)

    def fire_faults(self, step: int) -> None:
        for fault in [f for f in self.faults if step >= f["step"]]:
            self.faults.remove(fault)
            self.loop.report(
                {"op": "fault", "node": self.node, "kind": fault["kind"], "step": step}
            )
            kind = fault["kind"]
            if kind == "kill":
                self.kill()
                return
            if kind == "freeze":
                self.frozen = True
                with contextlib.suppress(KeyError, ValueError):
                    self.loop.selector.unregister(self.sock)
            elif kind == "unhealthy":
                self.send(VerdictReport("running", verdict_record(self.node, "running", False)))
            elif kind == "straggler":
                self.slow = float(fault.get("slow", 4.0))

    def kill(self) -> None:
        """As a dead host: the connection is reset (no goodbye), the agent is gone."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.frozen = True
        self.loop.remove(self, -9)


class Loop:
    """The process's agents, its command pipe and its clock."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.agents: dict[str, SimAgent] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.stdin = sys.stdin.buffer
        os.set_blocking(self.stdin.fileno(), False)
        self.selector.register(self.stdin, selectors.EVENT_READ, None)
        self.commands = b""
        self.running = True

    def plan(self, path: str) -> dict[str, Any]:
        """A plan file, read once per process (every agent of an attempt reads the same)."""
        if path not in self.plans:
            self.plans = {path: json.loads(Path(path).read_text())}
        return self.plans[path]

    def report(self, fields: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({**fields, "time": time.time()}) + "\n")
        sys.stdout.flush()

    def remove(self, agent: SimAgent, code: int) -> None:
        if self.agents.get(agent.node) is not agent:
            return
        del self.agents[agent.node]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(agent.sock)
        with contextlib.suppress(OSError):
            agent.sock.close()
        self.report({"op": "exited", "node": agent.node, "code": code})

    def command(self, fields: dict[str, Any]) -> None:
        op, node = fields.get("op"), fields.get("node", "")
        if op == "start":
            old = self.agents.get(node)
            if old is not None:
                self.remove(old, -9)
            try:
                agent = SimAgent(self, node, fields["endpoint"], fields["token"], fields)
            except OSError as error:
                self.report({"op": "exited", "node": node, "code": 1, "error": str(error)})
                return
            self.agents[node] = agent
            self.selector.register(agent.sock, selectors.EVENT_READ, agent)
        elif op == "kill" and node in self.agents:
            self.agents[node].kill()

    def read_commands(self) -> None:
        data = self.stdin.read()
        if data == b"":
            self.running = False
            return
        self.commands += data or b""
        *lines, self.commands = self.commands.split(b"\n")
        for line in lines:
            if line.strip():
                self.command(json.loads(line))

    def run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(TICK_S):
                if key.data is None:
                    self.read_commands()
                else:
                    key.data.readable()
            now = time.monotonic()
            for agent in list(self.agents.values()):
                agent.tick(now)
                agent.flush()


def main() -> int:
    loop = Loop()
    try:
        loop.run()
    finally:
        for agent in list(loop.agents.values()):
            with contextlib.suppress(OSError):
                agent.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
