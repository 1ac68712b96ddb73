"""The simulation's scheduler adapter: node agents multiplexed in a few processes.

A `NodeScheduler` (`trainctl.launch.scheduler`) for tests and benchmarks of the control plane
at scale, never a user's: `trainctl launch` does not offer it (`--scheduler` takes local or
slurm); `trainctl.sim.job` hands it to the real controller through `run_job`. Node `i` lives
in process ``i % processes`` (`trainctl.sim.agents`), which the adapter starts on first use
with the job's tags in its environment (so the e2e harness finds, and checks, every process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from trainctl.env import Env


@dataclasses.dataclass(frozen=True)
class SimOptions:
    processes: int = 4
    step_s: float = 0.1
    """A step of the simulated training."""
    checkpoint_every: int = 0
    """Steps between simulated checkpoint commits (0: none)."""
    faults: tuple[dict[str, Any], ...] = ()
    """``{"kind": kill|freeze|unhealthy|straggler, "node": NAME, "step": N}``, each fired once,
    the first time the node's clock reaches its step."""
    fault_log: str = ""
    """Where fired faults are appended (JSON lines with their wall-clock time), if set."""


class SimScheduler:
    name = "sim"

    def __init__(self, options: SimOptions, python: str = sys.executable) -> None:
        self.options = options
        self.python = python
        self.processes: list[subprocess.Popen[bytes]] = []
        self.exit_codes: dict[str, int | None] = {}
        self.where: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fired: list[str] = []
        self.dead: set[str] = set()
        """Hosts a ``kill`` fault took down: their agent cannot be started again."""

    def _process(self, node: str, env: dict[str, str]) -> int:
        index = self.where.get(node)
        if index is None:
            index = self.where[node] = len(self.where) % self.options.processes
        while len(self.processes) <= index:
            tags = {k: env[k] for k in (Env.JOB_ID, Env.STORAGE) if k in env}
            process = subprocess.Popen(
                [self.python, "-m", "trainctl.sim.agents"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, **tags, Env.NODE: f"sim-{len(self.processes)}"},
                start_new_session=True,
            )
            assert process.stdout is not None
            threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()
            self.processes.append(process)
        return index

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            fields = json.loads(line)
            if fields["op"] == "exited":
                with self._lock:
                    self.exit_codes[fields["node"]] = int(fields["code"])
            elif fields["op"] == "fault":
                if fields["kind"] == "kill":
                    with self._lock:
                        self.dead.add(fields["node"])
                if not self.options.fault_log:
                    continue
                with open(self.options.fault_log, "a") as log:
                    log.write(line.decode())

    def _send(self, index: int, fields: dict[str, Any]) -> None:
        stdin = self.processes[index].stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(fields).encode() + b"\n")
            stdin.flush()
        except OSError:
            pass

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        with self._lock:
            if node in self.dead:  # the host is down: its agent never starts
                self.exit_codes[node] = 255
                return 0
        index = self._process(node, env)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        liveness = json.loads(env.get(Env.LIVENESS, "{}"))
        with self._lock:
            self.exit_codes[node] = None
        faults = [f for f in self.options.faults if f["node"] == node and node not in self._fired]
        self._fired.append(node)  # a node's faults fire in its first life only
        self._send(
            index,
            {
                "op": "start",
                "node": node,
                "endpoint": control_endpoint,
                "token": env[Env.CONTROL_TOKEN],
                "beat_s": liveness.get("interval_s", 0.25),
                "progress_s": float(env.get(Env.PROGRESS_INTERVAL) or 0.25),
                "step_s": self.options.step_s,
                "checkpoint_every": self.options.checkpoint_every,
                "faults": faults,
            },
        )
        return self.processes[index].pid

    # Reads take no lock: one dict lookup is atomic, and the controller asks these for every
    # node (a lock round-trip each was 6% of the controller's CPU at 1,024 nodes, a cost of
    # the simulation that no real scheduler adapter has).
    def agent_running(self, node: str) -> bool:
        return self.exit_codes.get(node, 0) is None

    def agent_exit_code(self, node: str) -> int | None:
        return self.exit_codes.get(node)

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        index = self.where.get(node)
        if index is not None and index < len(self.processes):
            self._send(index, {"op": "kill", "node": node})
        deadline = time.monotonic() + 5.0
        while self.agent_running(node) and time.monotonic() < deadline:
            time.sleep(0.005)

    def wait_agents(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(code is not None for code in self.exit_codes.values()):
                    return True
            time.sleep(0.02)
        return False

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        """The agents' processes end when their command pipe closes; what does not within
        the grace is killed (and returned)."""
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        killed = []
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed.append(process.pid)
        return killed
