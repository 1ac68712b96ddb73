"""The pure half of the Ray scheduler: what a job asks of the cluster and whether it fits."""

from __future__ import annotations

import pytest

from trainctl.launch.ray_placement import (
    NODE_ID_LABEL,
    Fit,
    RayNodeView,
    RayRequest,
    actor_spec,
    judge_fit,
    render_request,
)


def node(
    node_id: str, cpus: float = 1, free: float | None = None, alive: bool = True
) -> RayNodeView:
    return RayNodeView(
        node_id, "10.0.0.1", alive, {"CPU": cpus}, {"CPU": cpus if free is None else free}
    )


def request(bundles: int = 2, cpus: float = 1, excluded: tuple[str, ...] = ()) -> RayRequest:
    return RayRequest("trainctl-j", bundles, 2, cpus, 0.0, excluded)


@pytest.mark.parametrize(
    ("asked", "nodes", "first_run", "verdict", "says"),
    [
        (request(), [node("a"), node("b")], True, Fit.FITS, "2 Ray node(s) can hold"),
        (request(3), [node("a"), node("b")], True, Fit.NEVER, "2 alive node(s)"),
        (request(cpus=4), [node("a"), node("b")], True, Fit.NEVER, "0 of them that large"),
        (request(), [node("a"), node("b", alive=False)], True, Fit.NEVER, "1 alive"),
        (request(), [node("a"), node("b", alive=False)], False, Fit.SHORT_NOW, "1 are"),
        (request(), [node("a"), node("b", free=0)], True, Fit.SHORT_NOW, "1 busy"),
        (
            request(excluded=("b",)),
            [node("a"), node("b"), node("c")],
            True,
            Fit.FITS,
            "2 Ray node(s)",
        ),
        (
            request(excluded=("b",)),
            [node("a"), node("b")],
            False,
            Fit.SHORT_NOW,
            "1 excluded by the job's blocklist",
        ),
    ],
)
def test_judge_fit(
    asked: RayRequest, nodes: list[RayNodeView], first_run: bool, verdict: Fit, says: str
) -> None:
    got, reason = judge_fit(asked, nodes, first_run)
    assert got is verdict and says in reason, reason


def test_blocklisted_node_ids_become_one_label_selector_per_bundle() -> None:
    asked = RayRequest("trainctl-j", 3, 2, 2, 1, excluded=("ffff", "aaaa"))
    assert asked.bundles() == [{"CPU": 2, "GPU": 1}] * 3
    assert asked.label_selectors() == [{NODE_ID_LABEL: "!in(aaaa,ffff)"}] * 3
    assert request().label_selectors() is None


def test_the_dry_run_names_the_group_its_bundles_and_each_pinned_actor() -> None:
    asked = request(3, excluded=("dead",))
    actors = [actor_spec(asked, i, ["python", "-m", "trainctl.launch.agent"]) for i in range(3)]
    text = render_request(asked, actors)
    assert "strategy STRICT_SPREAD, 3 bundle(s) of {'CPU': 1} (2 active, 1 spare)" in text
    assert "!in(dead)" in text and "bundle 2: actor" in text
    assert actors[1]["scheduling_strategy"]["placement_group_bundle_index"] == 1
