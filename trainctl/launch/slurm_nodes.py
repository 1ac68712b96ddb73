"""Node agents as Slurm job steps: the controller's scheduler adapter inside an allocation.

`trainctl resume` runs as the batch process on the allocation's first node (the batch script
`exec`s it); it reads the allocation once, here at the edge (`SlurmAllocation.from_env`), and
starts one agent per node with `srun --overlap` (`SrunNodeLauncher`). The controller listens
on the first node's address (`NodeAddr`), which is also the rendezvous endpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

from trainctl.launch.slurm import SlurmClient, SrunNodeLauncher


@dataclasses.dataclass(frozen=True)
class SlurmAllocation:
    slurm_job_id: str
    nodes: tuple[str, ...]
    """The allocation's node names, in Slurm's order (the batch host first)."""
    batch_host: str
    address: str
    """The batch host's address: where the controller listens and the rendezvous store runs."""
    restart_count: int | None
    """SLURM_RESTART_COUNT (None on the first run)."""

    @classmethod
    def from_env(cls, client: SlurmClient, environ: Mapping[str, str]) -> SlurmAllocation:
        nodes = tuple(client.hostnames(environ["SLURM_JOB_NODELIST"]))
        batch_host = environ.get("SLURMD_NODENAME") or nodes[0]
        restarts = environ.get("SLURM_RESTART_COUNT")
        return cls(
            slurm_job_id=environ["SLURM_JOB_ID"],
            nodes=nodes,
            batch_host=batch_host,
            address=client.node_address(batch_host),
            restart_count=int(restarts) if restarts else None,
        )


def inside_allocation(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID") and environ.get("SLURM_JOB_NODELIST"))


class SlurmNodes:
    """`NodeScheduler` for a Slurm allocation: each node's agent is an `srun` step."""

    name = "slurm"

    def __init__(self, slurm_job_id: str, python: str, client: SlurmClient) -> None:
        self.python = python
        self.launcher = SrunNodeLauncher(slurm_job_id, client)

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        argv = [self.python, "-m", "trainctl.launch.agent", node, control_endpoint]
        return self.launcher.start_agent(node, argv, env, log_path).pid

    def agent_running(self, node: str) -> bool:
        return node in self.launcher.agents and self.launcher.poll(node) is None

    def agent_exit_code(self, node: str) -> int | None:
        return self.launcher.poll(node)

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        if node in self.launcher.agents:
            self.launcher.kill_agent(node, grace_s)

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        running = [n for n in self.launcher.agents if self.launcher.poll(n) is None]
        self.launcher.stop_all(grace_s)
        return [self.launcher.agents[n].pid for n in running]

    def wait_agents(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.launcher.poll(n) is not None for n in self.launcher.agents):
                return True
            time.sleep(0.05)
        return False
