"""A rack is one failure: nodes lost with the blamed one are excluded with it (table test)."""

from __future__ import annotations

import pytest

from trainctl.recovery import placement, policy

NODES = tuple(f"node-{i}" for i in range(6))


def view(*lost: tuple[str, float]) -> policy.AttemptView:
    return policy.AttemptView(nodes=NODES, lost=tuple(policy.NodeLost(n, t) for n, t in lost))


@pytest.mark.parametrize(
    ("lost", "expected"),
    [
        ([("node-1", 100.0)], ()),
        ([("node-1", 100.0), ("node-2", 100.02), ("node-3", 100.9)], ("node-2", "node-3")),
        # Lost later (a node the controller killed when it did not answer the stop): not blamed.
        ([("node-1", 100.0), ("node-2", 100.1), ("node-4", 106.0)], ("node-2",)),
    ],
)
def test_nodes_lost_within_the_window_are_lost_together(
    lost: list[tuple[str, float]], expected: tuple[str, ...]
) -> None:
    seen = view(*lost)
    decision = policy.decide(200.0, seen)
    assert decision.blamed == "node-1"
    assert policy.lost_together(decision, seen) == expected


def test_a_software_error_blames_nobody_together() -> None:
    decision = policy.Decision(policy.Action.FAIL, "boom", cause=policy.Cause.SOFTWARE_ERROR)
    assert policy.lost_together(decision, view(("node-1", 1.0), ("node-2", 1.0))) == ()


def test_the_recovery_plan_excludes_the_whole_incident_and_promotes_spares() -> None:
    decision = policy.Decision(
        policy.Action.FAIL,
        "node-1: node agent lost",
        blamed="node-1",
        cause=policy.Cause.NODE_FAULT,
        lost_with=("node-2", "node-3"),
    )
    budgets = placement.Budgets(
        max_restarts=10,
        per_cause={},
        crash_loop_limit=3,
        exclude_s=3600,
        nodes=4,
        fewest_nodes=3,
    )
    recovery = placement.plan_recovery(
        0.0, decision, budgets, {}, [], None, NODES[:4], ["node-4", "node-5"], {}
    )
    assert {e.node for e in recovery.exclude} == {"node-1", "node-2", "node-3"}
    assert recovery.selection is not None
    assert set(recovery.selection.nodes) == {"node-0", "node-4", "node-5"}
    assert recovery.selection.shrunk
