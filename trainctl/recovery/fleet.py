"""The job's node agents: started, kept (spares on standby), stopped, and killed when silent.

Node agents live for the whole job; the fleet knows which are connected (said hello and did
not go away), starts missing ones through the scheduler adapter, keeps the standby pool full
(bringing back a node whose exclusion expired, for a probe: `placement.reprobe` decides), and
kills what no longer answers. It decides nothing about blame or exclusion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from trainctl.events import Cleanup, NodeReprobe
from trainctl.health.liveness import Silent
from trainctl.launch.control import ControlServer
from trainctl.launch.scheduler import NodeScheduler
from trainctl.protocol import Message, Shutdown
from trainctl.recovery import placement, policy
from trainctl.recovery.journal import Journal

AGENT_CONNECT_TIMEOUT_S = 60.0
"""How long a node agent may take to connect before its node counts as lost."""
REFILL_INTERVAL_S = 1.0
"""How often the standby pool is checked."""

SILENCE_CHECK_S = 0.05
"""Every node's heartbeats are judged at most this often (the attempt's loop turns many times
a second at 1,024 nodes, and each judgement looks at every node: a few ms there)."""

EXIT_CHECK_S = 0.05
"""Agents' processes are asked for an exit code at most this often (or every N / 8,192 s:
0.5 s at 4,096 nodes, where 20 scans a second were 5% of the controller's CPU)."""

AgentEnv = Callable[[str], tuple[dict[str, str], str]]
"""node -> (the environment its agent starts with, its log path)."""


class Fleet:
    def __init__(
        self,
        scheduler: NodeScheduler,
        server: ControlServer,
        journal: Journal,
        agent_env: AgentEnv,
        spares: int,
    ) -> None:
        self.scheduler = scheduler
        self.server = server
        self.journal = journal
        self.agent_env = agent_env
        self.spares = spares
        self.connected: set[str] = set()
        """Nodes whose agent said hello and has not gone away."""
        self.hello_at: dict[str, float] = {}
        self.holders: dict[str, str] = {}
        """Each connected agent's memory-tier holder endpoint (host:port)."""
        """When each node's current agent said hello (unix time, the agent's clock)."""
        self.started: dict[str, float] = {}
        """Node -> monotonic time its agent was started."""
        self.active: tuple[str, ...] = ()
        """The nodes of the attempt being started or running."""
        self._last_refill = 0.0
        self._silent: dict[str, Silent[str]] = {}
        self._last_silence_check = 0.0
        self._last_exit_check = 0.0

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.journal.record.nodes]

    def up(self, name: str) -> bool:
        return name in self.connected or self.scheduler.agent_running(name)

    def send(self, name: str, message: Message) -> bool:
        return self.server.send(name, message)

    def standby(self) -> list[str]:
        """Nodes neither in the attempt nor excluded."""
        return placement.standby(self.names, self.active, self.journal.blocklist, time.time())

    def waiting(self) -> list[str]:
        """Spares on standby whose agent is connected."""
        return [n for n in self.standby() if n in self.connected]

    def usable_spares(self) -> list[str]:
        """Spares a recovery may use: connected, or started and still coming up (a failure in
        the first seconds must not end the job because a spare's agent has not said hello
        yet; the relaunch waits for it like any node it starts)."""
        return [
            n
            for n in self.standby()
            if n in self.connected or (n in self.started and self.scheduler.agent_running(n))
        ]

    # -- starting ----------------------------------------------------------------------------
    def start(self, nodes: Sequence[str]) -> None:
        """Start the agents of `nodes` that are not running yet."""
        for name in nodes:
            if name in self.connected or self.scheduler.agent_running(name):
                continue
            env, log_path = self.agent_env(name)
            pid = self.scheduler.start_agent(name, env, log_path, self.server.endpoint)
            self.journal.record.node(name).pid = pid
            self.started[name] = time.monotonic()

    def wait_for(
        self,
        nodes: Sequence[str],
        pump: Callable[[float], None],
        stop_requested: Callable[[], bool],
    ) -> list[policy.Observation]:
        """Pump messages until every node of `nodes` said hello; a node whose agent ended or
        did not connect in time is lost."""
        deadline = time.monotonic() + AGENT_CONNECT_TIMEOUT_S
        while not all(n in self.connected for n in nodes):
            pump(0.05)
            lost = self.check([n for n in nodes if n in self.connected], set())
            if lost:
                return lost
            # Every node that cannot come is reported at once (a rack that went down together
            # is one failure, not one relaunch per node).
            gone: list[policy.Observation] = [
                policy.NodeLost(name, time.time())
                for name in nodes
                if name not in self.connected
                and (
                    self.scheduler.agent_exit_code(name) is not None or time.monotonic() > deadline
                )
            ]
            if gone:
                return gone
            if stop_requested():
                break
        return []

    def refill(self) -> None:
        """Keep the standby pool full: a node whose exclusion expired gets its agent back and
        a standby probe; a clean verdict readmits it (`placement.judge_standby`)."""
        now = time.monotonic()
        if now - self._last_refill < REFILL_INTERVAL_S:
            return
        self._last_refill = now
        waiting = [n for n in self.standby() if self.up(n)]
        agents_up = {n for n in self.names if self.up(n)}
        chosen, reason = placement.reprobe(
            self.spares, waiting, agents_up, self.active, self.journal.blocklist, time.time()
        )
        if chosen:
            self.journal.event(NodeReprobe(), reason, node=chosen[0])
            self.start(chosen)

    # -- noticing ------------------------------------------------------------------------------
    def check(self, nodes: Sequence[str], done: set[str]) -> list[policy.Observation]:
        """An agent of `nodes` (not in `done`) whose process ended without reporting, or whose
        heartbeats stopped, is lost. Silent agents elsewhere (spares) wait in `silent_spares`."""
        now = time.monotonic()
        # Judged at most four times a beat interval (that interval grows with N): more often
        # only recomputes every node's φ between two beats (5% of the controller at 1,024).
        if now - self._last_silence_check >= max(
            SILENCE_CHECK_S, self.server.policy.interval_s / 4
        ):
            self._last_silence_check = now
            self._silent.update({s.peer: s for s in self.server.silent()})
        # An agent's process ending unheard is asked of the scheduler at most every
        # EXIT_CHECK_S: N questions a turn of the loop were 8% of the controller at 1,024
        # nodes (a lost agent's connection closing is heard at once, through `Disconnected`).
        every = max(EXIT_CHECK_S, len(self.journal.record.nodes) / 8192)
        exits = now - self._last_exit_check >= every
        if exits:
            self._last_exit_check = now
        lost: list[policy.Observation] = []
        if not self._silent and not exits:
            return lost
        for name in nodes:
            if name in done:
                continue
            silent = self._silent.pop(name, None)
            if silent is not None:
                lost.append(policy.NodeLost(name, silent.last_heard, f"agent {silent.reason}"))
            elif exits and self.scheduler.agent_exit_code(name) is not None:
                lost.append(policy.NodeLost(name, time.time()))
        return lost

    def silent_spares(self) -> list[Silent[str]]:
        """Agents outside the attempt whose heartbeats stopped (taken: each is reported once)."""
        spares = [s for name, s in self._silent.items() if name not in self.active]
        for silent in spares:
            del self._silent[silent.peer]
        return spares

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, name: str, reason: str) -> None:
        """Ask a node's agent to end (the node leaves the job)."""
        self.server.send(name, Shutdown(reason))
        self.connected.discard(name)

    def kill(self, name: str) -> None:
        """Kill everything of the job on `name` (its agent does not answer, or is lost) and
        close its connection: whatever it still sends is not heard."""
        self.server.drop(name)
        self.scheduler.kill_node(self.journal.job_id, name)
        self.connected.discard(name)
        self._silent.pop(name, None)

    def shutdown(self) -> None:
        """End every agent: ask, wait a little, then kill what is left."""
        for name in list(self.connected):
            self.server.send(name, Shutdown("job ended"))
        self.scheduler.wait_agents(5.0)
        leftovers = self.scheduler.stop_all(self.journal.job_id, grace_s=1.0)
        if leftovers:
            self.journal.event(
                Cleanup(pids=leftovers), f"killed {len(leftovers)} leftover process(es)"
            )
        self.connected.clear()
