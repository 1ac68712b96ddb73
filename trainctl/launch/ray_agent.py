"""The Ray actor that runs one trainctl node agent inside its placement-group bundle.

The actor is placed on the bundle's Ray node (with the bundle's CPUs and GPUs, so Ray sets
`CUDA_VISIBLE_DEVICES` for it) and starts the real agent there as a child process,
`python -m trainctl.launch.agent NODE CONTROL_ENDPOINT` — the same agent the local and Slurm
schedulers start, owning its torchrun and workers. The actor is threaded (`max_concurrency`):
`wait` blocks until the agent ends while `stop` can still tear the node's processes down
(found by the job and node tags the agent's tree carries). Plain Python: the actor class is
made a Ray actor by `ray_nodes`, so importing this module needs no `ray`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from trainctl.launch import proctree
from trainctl.protocol import Env


class NodeAgentActor:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.job_id = ""
        self.node = ""

    def start(
        self, node: str, control_endpoint: str, env: dict[str, str], log_path: str
    ) -> dict[str, object]:
        """Start the node's agent here; returns its pid and where it runs."""
        self.job_id, self.node = env.get(Env.JOB_ID, ""), node
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trainctl.launch.agent", node, control_endpoint],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return {"pid": self.process.pid, "host": os.uname().nodename}

    def wait(self) -> int:
        """Block until the agent ends; its exit code."""
        assert self.process is not None, "start the agent first"
        return self.process.wait()

    def stop(self, grace_s: float) -> list[int]:
        """End everything of the job on this node: SIGTERM to the agent, `grace_s` for the
        tree to go, then SIGKILL to what is left. Returns the pids that had to be killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        pids = [
            pid
            for pid in proctree.tagged(Env.JOB_ID, self.job_id)
            if pid in set(proctree.tagged(Env.NODE, self.node))
        ]
        own = [self.process.pid] if self.process is not None else []
        killed = proctree.kill_tree(pids, grace_s, keep_reaped=own)
        if self.process is not None:
            try:
                self.process.wait(timeout=max(grace_s, 1.0))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return killed
