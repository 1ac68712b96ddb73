"""Node agents on a Ray cluster: the controller's scheduler adapter when it runs as a Ray driver.

The only module (with `ray_binding`) that imports `ray`, lazily. It connects to the cluster,
reads its nodes once (`cluster_nodes`), makes the job's placement group and waits for it
(`place`: gang scheduling, every bundle or none), and starts one `NodeAgentActor` pinned to
each bundle (`RayNodes.start_agent`), which runs the real node agent.

A node is lost either way, whichever is seen first: its agent's connection (heartbeats, the
control server) or Ray's own notice that the node died (`RayNodes.agent_exit_code` asks the
cluster, at most every `NODE_POLL_S`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

from trainctl.errors import TrainctlError, UserError
from trainctl.exitcodes import ExitCode
from trainctl.launch import proctree
from trainctl.launch.ray_placement import STRATEGY, RayNodeView, RayRequest
from trainctl.protocol import Env

NODE_POLL_S = 0.5
"""How often Ray is asked which nodes are alive."""
NODE_DIED = -int(signal.SIGKILL)
"""The exit code an agent gets when Ray reports its node dead (as if the host was killed)."""
ACTOR_CALL_TIMEOUT_S = 60.0


class RayUnavailable(TrainctlError):
    """The Ray cluster could not be reached (retry allowed: exit 1)."""

    exit_code = ExitCode.FAILED


class PlacementShort(TrainctlError):
    """The cluster cannot give the job its placement now (exit 1: resume when capacity
    returns)."""

    exit_code = ExitCode.FAILED


def connect(address: str) -> None:
    """Join the cluster at `address` (`auto`: the one this host belongs to) as a driver."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "ray is not installed",
            where="--scheduler ray",
            fix="pip install 'trainctl[ray]' (on the driver and on every Ray node)",
        ) from None

    if ray.is_initialized():
        return
    _reachable(address)
    try:
        ray.init(
            address=address,
            namespace="trainctl",
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayUnavailable(f"cannot join the Ray cluster at {address}: {error}") from None
    _keep_stdout_for_answers()


def _keep_stdout_for_answers() -> None:
    """Ray's driver prints the cluster's error notices ("(raylet) Raylet is terminated...") to
    stdout; trainctl's stdout is what a command answers (a job id, one JSON object), so those
    notices go to stderr with the rest of the progress chatter."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_trainctl", False):
        return  # another Ray release: its notices may reach stdout

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._trainctl = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def _reachable(address: str) -> None:
    """Fail fast on a GCS address nothing listens on (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # `auto` or a ray:// address: Ray resolves it
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except OSError as error:
        raise RayUnavailable(f"no Ray cluster answers at {address}: {error}") from None


def gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def driver_address() -> str:
    """This host's address as the cluster sees it (where the controller listens)."""
    import ray

    return str(ray.util.get_node_ip_address())


def cluster_nodes() -> list[RayNodeView]:
    """Every node the cluster knows, alive or dead, with its total and free resources."""
    import ray
    from ray._private import state

    try:
        free: dict[str, Any] = state.available_resources_per_node()
    except Exception:  # an older or newer Ray: judge by totals, placement still waits
        free = {}
    views = []
    for node in ray.nodes():
        total = {k: float(v) for k, v in node.get("Resources", {}).items()}
        views.append(
            RayNodeView(
                node_id=node["NodeID"],
                address=node.get("NodeManagerAddress", ""),
                alive=bool(node.get("Alive")),
                total=total,
                available={k: float(v) for k, v in free.get(node["NodeID"], total).items()},
            )
        )
    return views


@dataclasses.dataclass
class Placement:
    """A placement group that is ready: which Ray node holds each bundle."""

    group: Any
    request: RayRequest
    node_ids: list[str]
    """Bundle index -> Ray node id."""
    addresses: list[str]
    """Bundle index -> that node's address."""

    @property
    def group_id(self) -> str:
        return str(self.group.id.hex())

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def place(request: RayRequest, timeout_s: float) -> Placement:
    """Make the request's placement group and wait up to `timeout_s` for all its bundles
    (none start before all are placed). Raises `PlacementShort` (and removes the group) when
    the cluster did not place it in time."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    group = placement_group(
        request.bundles(),
        strategy=STRATEGY,
        name=request.name,
        bundle_label_selector=request.label_selectors(),
    )
    if not group.wait(timeout_s):
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
        raise PlacementShort(
            f"Ray did not place the job's {request.num_bundles} bundle(s) of "
            f"{request.bundle()} ({STRATEGY}, {len(request.excluded)} node(s) excluded) within "
            f"{timeout_s:g} s: the cluster is short of free nodes now"
        )
    table = placement_group_table(group)
    by_bundle = table["bundles_to_node_id"]
    node_ids = [str(by_bundle[index]) for index in range(request.num_bundles)]
    address = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}
    return Placement(group, request, node_ids, [address.get(n, "") for n in node_ids])


def group_view(group_id: str) -> dict[str, Any] | None:
    """Ray's view of a placement group: its state and which node holds each bundle (None:
    Ray no longer knows it)."""
    import ray
    from ray.util.placement_group import placement_group_table

    for table in placement_group_table().values():
        if table.get("placement_group_id") == group_id:
            alive = {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}
            nodes = {int(i): str(n) for i, n in table.get("bundles_to_node_id", {}).items()}
            return {
                "state": table.get("state"),
                "bundles": {
                    i: {"node_id": n, "alive": alive.get(n, False)} for i, n in nodes.items()
                },
            }
    return None


class RayNodes:
    """`NodeScheduler` on Ray: one `NodeAgentActor` per trainctl node, pinned to its bundle.

    trainctl node names are the Ray node ids that hold the bundles (so the job's blocklist
    keeps Ray node ids out of the next placement group)."""

    name = "ray"

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.bundle_of = {node: index for index, node in enumerate(placement.node_ids)}
        self.actors: dict[str, Any] = {}
        self.waits: dict[str, Any] = {}
        self.codes: dict[str, int] = {}
        self._alive: set[str] = set(placement.node_ids)
        self._polled = 0.0

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from trainctl.launch.ray_agent import NodeAgentActor

        old = self.actors.pop(node, None)
        if old is not None:
            ray.kill(old, no_restart=True)
        request = self.placement.request
        actor: Any = (
            ray.remote(NodeAgentActor)
            .options(
                num_cpus=request.cpus,
                num_gpus=request.gpus,
                max_concurrency=4,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement.group, placement_group_bundle_index=self.bundle_of[node]
                ),
            )
            .remote()
        )
        info: dict[str, Any] = ray.get(
            actor.start.remote(node, control_endpoint, env, log_path),
            timeout=ACTOR_CALL_TIMEOUT_S,
        )
        self.actors[node] = actor
        self.waits[node] = actor.wait.remote()
        self.codes.pop(node, None)
        return int(info["pid"])

    def _node_alive(self, node: str) -> bool:
        """Ray's own view (polled at most every NODE_POLL_S): is the node still alive?"""
        import ray

        now = time.monotonic()
        if now - self._polled >= NODE_POLL_S:
            self._polled = now
            self._alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return node in self._alive

    def agent_exit_code(self, node: str) -> int | None:
        import ray

        if node in self.codes:
            return self.codes[node]
        ref = self.waits.get(node)
        if ref is None:
            return None
        ready, _ = ray.wait([ref], timeout=0)
        if ready:
            try:
                self.codes[node] = int(ray.get(ref))
            except ray.exceptions.RayError:
                self.codes[node] = NODE_DIED  # the actor died with its node
        elif not self._node_alive(node):
            self.codes[node] = NODE_DIED
        return self.codes.get(node)

    def agent_running(self, node: str) -> bool:
        return node in self.waits and self.agent_exit_code(node) is None

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        """Stop the node's agent tree through its actor, then the actor; on a dead Ray node
        (its host gone) what of the node is visible on this host is killed here too."""
        self._stop([node], grace_s)
        _kill_local(job_id, [node])

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        killed = self._stop(list(self.actors), grace_s)
        return killed + _kill_local(job_id, list(self.actors))

    def _stop(self, nodes: list[str], grace_s: float) -> list[int]:
        import ray

        calls = {n: self.actors[n].stop.remote(grace_s) for n in nodes if n in self.actors}
        killed: list[int] = []
        for node, call in calls.items():
            try:
                killed += ray.get(call, timeout=grace_s + ACTOR_CALL_TIMEOUT_S / 4)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # the actor is gone (its node died) or stuck: it is killed below
            ray.kill(self.actors[node], no_restart=True)
        return killed

    def wait_agents(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.agent_exit_code(n) is not None for n in self.waits):
                return True
            time.sleep(0.05)
        return False


def _kill_local(job_id: str, nodes: list[str]) -> list[int]:
    """SIGKILL the processes of `nodes` of the job that run on this host (a Ray node on the
    driver's host whose raylet died leaves its actor's children behind)."""
    mine = set(proctree.tagged(Env.JOB_ID, job_id))
    pids = [pid for node in nodes for pid in proctree.tagged(Env.NODE, node) if pid in mine]
    proctree.signal_all(pids, signal.SIGKILL)
    return pids
