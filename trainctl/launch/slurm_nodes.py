"""Node agents as Slurm job steps: the controller's scheduler adapter inside an allocation.

`trainctl resume` runs as the batch process on the allocation's first node (the batch script
`exec`s it); it reads the allocation once, here at the edge (`SlurmAllocation.from_env`), and
starts one agent per node with `srun --overlap` (`SrunNodeLauncher`). The controller listens
on the first node's address (`NodeAddr`), which is also the rendezvous endpoint.

Inside an allocation Slurm 22.05 gives a step the node's CPUs exclusively, so a second step on
that node (an agent restarted while the old step winds down) would wait "step creation
temporarily disabled"; `--overlap` lets the steps share the node, as agents and their torchrun
must.

GPUs need no flag of their own here: on Slurm 22.05 an agent's step is given the allocation's
GPUs on its node — srun reads `SLURM_GPUS_PER_NODE` from the batch environment (the job's
`--gpus-per-node`), and a step gets all of the job's GRES by default (its `--gres`) — and
`--overlap` lets two steps on a node (an agent restarted beside the old one) share them.
slurmstepd then sets `CUDA_VISIBLE_DEVICES`/`SLURM_STEP_GPUS` for the agent, which torchrun and
the workers inherit (tests/slurm/test_slurm_gpus.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainctl.launch.slurm import SlurmClient, SlurmError

# -- node agents as job steps ---------------------------------------------------------------

AGENT_STEP_PREFIX = "trainctl-agent-"
"""An agent's step is named after its node, so on-call (`squeue --steps`) and
`SrunNodeLauncher.steps` can tell them apart."""


def srun_argv(slurm_job_id: str, node_host: str, argv: Sequence[str]) -> list[str]:
    """The srun command that runs `argv` as one task on the node `node_host` of the job.

    `--overlap`: steps share the node (see the module doc). `--kill-on-bad-exit=0`: a failing
    agent ends its own step only. `--export=ALL`: the agent gets srun's environment.
    `--mpi=none`: torchrun needs no MPI set-up. `--job-name`: the step is named after its node.
    """
    return [
        "srun",
        f"--jobid={slurm_job_id}",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={node_host}",
        "--overlap",
        "--kill-on-bad-exit=0",
        "--export=ALL",
        "--mpi=none",
        f"--job-name={AGENT_STEP_PREFIX}{node_host}",
        *argv,
    ]


class SrunNodeLauncher:
    """Starts, polls and kills one node agent per node as steps of one Slurm job.

    The agent's output comes back through srun into `log_path` on this host (no shared file
    system needed for logs). Sending SIGTERM to srun makes Slurm SIGKILL the step's tasks
    (srun's own rule), so `kill_agent` first asks the step itself with `scancel --signal`.
    """

    def __init__(self, slurm_job_id: str, client: SlurmClient | None = None) -> None:
        self.slurm_job_id = slurm_job_id
        self.client = client or SlurmClient()
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def start_agent(
        self, node_host: str, argv: Sequence[str], env: Mapping[str, str], log_path: str
    ) -> subprocess.Popen[bytes]:
        """Start `argv` on `node_host` with `env` added to this environment; returns the srun."""
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                srun_argv(self.slurm_job_id, node_host, argv),
                env={**self.client.environment(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.agents[node_host] = process
        return process

    def poll(self, node_host: str) -> int | None:
        """The agent's exit code (srun passes on the task's), or None while it runs."""
        process = self.agents.get(node_host)
        return None if process is None else process.poll()

    def steps(self) -> dict[str, str]:
        """The job's live agent steps: node -> step id (`JOB.STEP`), from one `squeue`."""
        out = self.client.run(
            ["squeue", "--noheader", "--steps", f"--jobs={self.slurm_job_id}", "--format=%i|%j"]
        )
        found = {}
        for line in out.splitlines():
            step, _, name = line.partition("|")
            if name.startswith(AGENT_STEP_PREFIX):
                found[name[len(AGENT_STEP_PREFIX) :]] = step
        return found

    def kill_agent(self, node_host: str, grace_s: float = 0.0) -> int | None:
        """Stop the node's agent: SIGTERM to its step and `grace_s` to exit, then SIGKILL.

        Returns srun's exit code: the agent's own after a graceful exit, non-zero when it was
        killed, None if srun itself had to be killed (or never started one here).
        """
        return self.stop_agents([node_host], grace_s).get(node_host)

    def stop_all(self, grace_s: float) -> dict[str, int | None]:
        """Stop every agent still running (all asked at once); returns srun's exit codes."""
        return self.stop_agents(list(self.agents), grace_s)

    def stop_agents(self, node_hosts: Sequence[str], grace_s: float) -> dict[str, int | None]:
        """Ask the agents on `node_hosts` to stop (SIGTERM to their steps, `scancel --signal`),
        give them `grace_s` together, then kill what is left: SIGTERM to its srun, which has
        Slurm SIGKILL the step's tasks; an srun that does not end is killed, with its step."""
        codes: dict[str, int | None] = {}
        running = [host for host in node_hosts if self.poll(host) is None]
        steps = self._steps_quietly() if running else {}
        if grace_s > 0:
            for host in running:
                if host in steps:
                    self._scancel_quietly(["--signal=TERM", steps[host]])
            deadline = time.monotonic() + grace_s
            for host in running:
                try:
                    self.agents[host].wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for host in node_hosts:
            process = self.agents.get(host)
            if process is None:
                codes[host] = None
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.client.timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    if host in steps:
                        self._scancel_quietly(["--signal=KILL", steps[host]])
                    codes[host] = None
                    continue
            codes[host] = process.returncode
        return codes

    def _steps_quietly(self) -> dict[str, str]:
        try:
            return self.steps()
        except SlurmError:
            return {}  # no step to signal: the agents are killed through srun

    def _scancel_quietly(self, args: list[str]) -> None:
        try:
            self.client.run(["scancel", *args])
        except SlurmError:
            pass  # the step ended meanwhile


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
