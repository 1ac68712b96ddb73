"""What a job asks of a Ray cluster, and whether the cluster can give it (pure; no `ray`).

A job's nodes are one placement group: one bundle per trainctl node (spares are extra
bundles), `STRICT_SPREAD` so no two trainctl nodes share a Ray node, every bundle carrying a
label selector that keeps the blocklisted Ray node ids out (`ray.io/node-id` is a label every
Ray node has). `judge_fit` compares the request with the cluster's nodes, read once at the
edge (`ray_nodes.cluster_nodes`), before anything is placed: a request no node could ever hold
is bad input (exit 2); one the cluster is only short of now is retried later (exit 1).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

STRATEGY = "STRICT_SPREAD"
NODE_ID_LABEL = "ray.io/node-id"
"""The label Ray gives every node: its node id."""


@dataclasses.dataclass(frozen=True)
class RayRequest:
    """One placement group for one controller run of a job."""

    name: str
    num_bundles: int
    """The job's nodes plus its spares."""
    num_active: int
    """How many of the bundles the first attempt uses (the rest are spares)."""
    cpus: float
    gpus: float
    excluded: tuple[str, ...] = ()
    """Ray node ids kept out (the job's blocklist)."""

    def bundle(self) -> dict[str, float]:
        resources = {"CPU": self.cpus}
        if self.gpus:
            resources["GPU"] = self.gpus
        return resources

    def bundles(self) -> list[dict[str, float]]:
        return [self.bundle() for _ in range(self.num_bundles)]

    def label_selectors(self) -> list[dict[str, str]] | None:
        """One selector per bundle: the node id not in the blocklist (None: nothing kept out)."""
        if not self.excluded:
            return None
        selector = {NODE_ID_LABEL: f"!in({','.join(sorted(self.excluded))})"}
        return [dict(selector) for _ in range(self.num_bundles)]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "strategy": STRATEGY,
            "bundles": self.bundles(),
            "bundle_label_selector": self.label_selectors(),
            "active_bundles": self.num_active,
            "spare_bundles": self.num_bundles - self.num_active,
        }


def actor_spec(request: RayRequest, index: int, argv: Sequence[str]) -> dict[str, Any]:
    """The node agent actor pinned to bundle `index` (what `--dry-run` prints)."""
    return {
        "actor": "trainctl.launch.ray_agent.NodeAgentActor",
        "num_cpus": request.cpus,
        "num_gpus": request.gpus,
        "scheduling_strategy": {
            "placement_group": request.name,
            "placement_group_bundle_index": index,
        },
        "runs": list(argv),
    }


@dataclasses.dataclass(frozen=True)
class RayNodeView:
    """One Ray node as the cluster reports it."""

    node_id: str
    address: str
    alive: bool
    total: Mapping[str, float]
    available: Mapping[str, float]


class Fit(str, enum.Enum):
    FITS = "fits"
    SHORT_NOW = "short_now"
    """Not now: too few healthy nodes free; capacity may return (exit 1, resume later)."""
    NEVER = "never"
    """No cluster of this shape can hold it (exit 2: change the request)."""


def _holds(resources: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(resources.get(name, 0.0) >= amount for name, amount in bundle.items())


def judge_fit(
    request: RayRequest, nodes: Sequence[RayNodeView], first_run: bool
) -> tuple[Fit, str]:
    """Whether the cluster's nodes can hold the request's bundles, one per node, and why.

    Too few nodes large enough is bad input on a job's first run (the cluster never had
    them); on a resume it is a cluster short of the nodes it lost, which may come back."""
    bundle = request.bundle()
    alive = [node for node in nodes if node.alive]
    big_enough = [node for node in alive if _holds(node.total, bundle)]
    need = request.num_bundles
    if len(big_enough) < need and first_run:
        return Fit.NEVER, (
            f"the job needs {need} Ray node(s) with {bundle} each (STRICT_SPREAD: one trainctl "
            f"node per Ray node); the cluster has {len(alive)} alive node(s), "
            f"{len(big_enough)} of them that large"
        )
    usable = [node for node in big_enough if node.node_id not in request.excluded]
    free = [node for node in usable if _holds(node.available, bundle)]
    if len(free) < need:
        kept_out = len(big_enough) - len(usable)
        return Fit.SHORT_NOW, (
            f"the job needs {need} Ray node(s) with {bundle} free; {len(free)} are "
            f"({kept_out} excluded by the job's blocklist, {len(usable) - len(free)} busy)"
        )
    return Fit.FITS, f"{len(free)} Ray node(s) can hold the {need} bundle(s)"


def render_request(request: RayRequest, actors: Sequence[Mapping[str, Any]]) -> str:
    """The placement group and the actors pinned to its bundles, as `--dry-run` prints them."""
    lines = [
        f"ray placement group {request.name}: strategy {STRATEGY}, "
        f"{request.num_bundles} bundle(s) of {request.bundle()} "
        f"({request.num_active} active, {request.num_bundles - request.num_active} spare)",
    ]
    selectors = request.label_selectors()
    if selectors:
        lines.append(f"  bundle_label_selector: {selectors[0]}")
    for index, actor in enumerate(actors):
        lines.append(
            f"  bundle {index}: actor {actor['actor']} (num_cpus={actor['num_cpus']}, "
            f"num_gpus={actor['num_gpus']}) runs: {' '.join(actor['runs'])}"
        )
    return "\n".join(lines)
