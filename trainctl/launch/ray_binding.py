"""A controller's binding on Ray: the job's placement group becomes its nodes.

`launch --scheduler ray` and `trainctl resume` of a Ray job both end here. `request_for` says
what the job asks (pure); `check` asks the cluster whether it could ever hold it (bad input,
exit 2, nothing started) and whether it can now (`PlacementShort`, exit 1); `bind` makes the
placement group (waited on: all bundles or none), names the job's nodes after the Ray node
ids that hold its bundles, and returns the `Binding` whose `after_run` gives the group back.
The controller listens (control channel and rendezvous store) on the driver's address, so
losing any bundle's node never takes the store with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from trainctl.errors import UserError
from trainctl.exitcodes import ExitCode
from trainctl.launch import ray_nodes
from trainctl.launch.ray_placement import Fit, RayRequest, judge_fit
from trainctl.recovery.journal import Journal
from trainctl.recovery.placement import Exclusion, excluded_now
from trainctl.schedulers import Binding
from trainctl.spec import JobSpec
from trainctl.state import JobRecord, NodeRecord, NodeState

DEFAULT_ADDRESS = "auto"
PLACEMENT_TIMEOUT_S = 60.0


def request_for(spec: JobSpec, job_id: str, excluded: tuple[str, ...] = ()) -> RayRequest:
    """One bundle per node and spare: the recipe's workers per node as CPUs (1 when one per
    GPU), its `slurm.gpus_per_node` as GPUs."""
    cpus = float(spec.nproc_per_node) if isinstance(spec.nproc_per_node, int) else 1.0
    return RayRequest(
        name=f"trainctl-{job_id}",
        num_bundles=spec.nodes + spec.spare_nodes,
        num_active=spec.nodes,
        cpus=cpus,
        gpus=float(spec.slurm.gpus_per_node),
        excluded=excluded,
    )


def blocked_ids(raw: Mapping[str, object], now: float) -> tuple[str, ...]:
    """The Ray node ids a job's stored blocklist keeps out now."""
    blocklist = {node: Exclusion.from_json(node, entry) for node, entry in raw.items()}  # type: ignore[arg-type]
    return tuple(sorted(excluded_now(blocklist, now)))


def check(request: RayRequest, first_run: bool) -> None:
    """Raise unless the cluster could hold `request` now: `UserError` (exit 2) when it never
    could, `PlacementShort` (exit 1) when it is short of free, healthy nodes now."""
    verdict, reason = judge_fit(request, ray_nodes.cluster_nodes(), first_run)
    if verdict is Fit.NEVER:
        raise UserError(
            f"the Ray cluster cannot hold this job: {reason}",
            where="--scheduler ray",
            fix="ask for fewer nodes or spares (nodes, spare_nodes) or smaller ones "
            "(nproc_per_node, slurm.gpus_per_node), or add Ray nodes",
        )
    if verdict is Fit.SHORT_NOW:
        raise ray_nodes.PlacementShort(reason)


def bind(record: JobRecord, spec: JobSpec, request: RayRequest, timeout_s: float) -> Binding:
    """Place the job's placement group and make its bundles the job's nodes (raises
    `PlacementShort` when Ray does not place it within `timeout_s`)."""
    placement = ray_nodes.place(request, timeout_s)
    known = {node.name: node for node in record.nodes}
    nodes = []
    for index, (node_id, address) in enumerate(
        zip(placement.node_ids, placement.addresses, strict=True)
    ):
        node = known.get(node_id) or NodeRecord(name=node_id)
        node.host = address
        if node_id not in known and index >= spec.nodes:
            node.state = NodeState.SPARE
        nodes.append(node)
    record.nodes = nodes + [
        n
        for n in known.values()
        if n.name not in placement.node_ids and n.state == NodeState.EXCLUDED
    ]
    record.scheduler = "ray"
    record.scheduler_job_id = f"{placement.group_id}@{ray_nodes.gcs_address()}"
    addresses = set(placement.addresses)

    def after_run(
        code: ExitCode, spec: JobSpec, journal: Journal, warn: Callable[[str], None]
    ) -> None:
        try:
            placement.remove()
        except Exception as error:  # the driver's exit gives it back too
            warn(f"could not remove the placement group {placement.group_id}: {error}")

    return Binding(
        ray_nodes.RayNodes(placement),
        rdzv_host=ray_nodes.driver_address(),
        node_addr=addresses.pop() if len(addresses) == 1 else "",
        after_run=after_run,
    )


def split_id(scheduler_job_id: str | None) -> tuple[str, str]:
    """(placement group id, GCS address) from a Ray job's `scheduler_job_id`."""
    group, _, address = (scheduler_job_id or "").partition("@")
    return group, address


def resume_binding(
    record: JobRecord, spec: JobSpec, raw_blocklist: Mapping[str, object], address: str | None
) -> Binding:
    """`trainctl resume` of a Ray job: a new placement group without the blocklisted nodes."""
    ray_nodes.connect(address or split_id(record.scheduler_job_id)[1] or DEFAULT_ADDRESS)
    request = request_for(spec, record.job_id, blocked_ids(raw_blocklist, time.time()))
    try:
        check(request, first_run=False)
        return bind(record, spec, request, PLACEMENT_TIMEOUT_S)
    except ray_nodes.PlacementShort as short:
        raise ray_nodes.PlacementShort(
            f"{short}; run `trainctl resume {record.job_id}` again once capacity returns"
        ) from None


def describe(record: JobRecord) -> dict[str, object]:
    """Ray's view of the job's placement group (`trainctl status`)."""
    group, address = split_id(record.scheduler_job_id)
    if record.state.terminal:
        return {"placement_group": group, "describe": "placement group given back (job ended)"}
    try:
        ray_nodes.connect(address or DEFAULT_ADDRESS)
        view = ray_nodes.group_view(group)
    except Exception as error:
        return {"placement_group": group, "describe": f"Ray unavailable: {error}"}
    if view is None:
        return {"placement_group": group, "describe": "Ray no longer knows the placement group"}
    bundles = view["bundles"]
    dead = [b for b in bundles.values() if not b["alive"]]
    return {
        "placement_group": group,
        "state": view["state"],
        "bundles": bundles,
        "describe": f"placement group {group}: {view['state']}, {len(bundles)} bundle(s)"
        + (f", {len(dead)} on a dead Ray node" if dead else ""),
    }
