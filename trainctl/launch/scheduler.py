"""What the controller needs from a scheduler adapter: start, watch and stop node agents.

Two adapters: `local.LocalScheduler` (simulated nodes: agent processes on this host) and
`slurm_nodes.SlurmNodes` (one `srun` step per node inside a Slurm allocation).
"""

from __future__ import annotations

from typing import Protocol


class NodeScheduler(Protocol):
    name: str

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        """Start the node's agent (it lives for the whole job); returns a pid to record."""
        ...

    def agent_running(self, node: str) -> bool: ...

    def agent_exit_code(self, node: str) -> int | None:
        """The agent's exit code once it ended; None while it runs (or was never started)."""
        ...

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        """Kill everything of the job on `node` (after its agent stopped answering)."""
        ...

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        """Last resort at the end: stop whatever of the job is left; returns killed pids."""
        ...

    def wait_agents(self, timeout_s: float) -> bool:
        """Wait for every agent to exit; True if they all did."""
        ...
