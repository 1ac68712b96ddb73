"""The local scheduler: simulated nodes on this host, one node agent process tree each.

Each agent runs in its own session (a terminal's Ctrl-C reaches only the controller, which
then stops the job in order) and carries the job and node tags in its environment, which its
torchrun and workers inherit; a node is killed by walking /proc for those tags.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from trainctl.env import Env
from trainctl.launch import proctree


class LocalScheduler:
    name = "local"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        """Start the node's agent (it lives for the whole job); returns its pid."""
        env = {**os.environ, **env}
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "trainctl.launch.agent", node, control_endpoint],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.agents[node] = process
        return process.pid

    def agent_running(self, node: str) -> bool:
        process = self.agents.get(node)
        return process is not None and process.poll() is None

    def agent_exit_code(self, node: str) -> int | None:
        process = self.agents.get(node)
        return None if process is None else process.poll()

    def node_processes(self, job_id: str, node: str) -> list[int]:
        """Every live process of the job on `node` (agent, torchrun, workers, their children)."""
        return [
            pid
            for pid in proctree.tagged(Env.JOB_ID, job_id)
            if pid in set(proctree.tagged(Env.NODE, node))
        ]

    def worker_pids(self, job_id: str, node: str, local_rank: int | None = None) -> list[int]:
        """The node's training workers (`zygote.worker_identity`), all or one local rank."""
        from trainctl.launch.zygote import worker_identity

        found = []
        for pid in self.node_processes(job_id, node):
            identity = worker_identity(pid)
            if identity is not None and local_rank in (None, identity[1]):
                found.append(pid)
        return sorted(found)

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        """Kill a node the hard way (as if the host died): every tagged process, SIGKILL."""
        pids = self.node_processes(job_id, node)
        if grace_s > 0:
            proctree.kill_tree(pids, grace_s, keep_reaped=self._popen_pids())
        else:
            proctree.signal_all(pids, signal.SIGKILL)
        self._reap()
        # A simulated node's RAM dies with it, as a real host's would: its memory tier (own
        # steps and the replicas it held for peers) is gone.
        from trainctl.checkpoint.memory import release_node_memory

        release_node_memory(job_id, node)

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        """Last resort after agents were asked to stop: kill whatever of the job is left."""
        for process in self.agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        leftovers = proctree.kill_tree(
            proctree.tagged(Env.JOB_ID, job_id), grace_s, keep_reaped=self._popen_pids()
        )
        self._reap()
        return leftovers

    def _popen_pids(self) -> list[int]:
        return [p.pid for p in self.agents.values()]

    def _reap(self) -> None:
        for process in self.agents.values():
            process.poll()
        proctree.reap_zombie_children(self._popen_pids())

    def wait_agents(self, timeout_s: float) -> bool:
        """Wait for every agent process to exit; True if they all did."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._reap()
            if all(p.poll() is not None for p in self.agents.values()):
                return True
            time.sleep(0.05)
        return False
