"""What happens after a failed attempt: classification, blame, exclusion, spares, shrink,
crash loops and budgets — pure decisions, table-tested."""

from __future__ import annotations

import pytest

from trainctl.errors import UserError
from trainctl.exitcodes import ExitCode
from trainctl.recipe import parse_fault
from trainctl.recovery.placement import (
    Budgets,
    Exclusion,
    FailureRecord,
    RecoveryAction,
    crash_loop_length,
    plan_recovery,
    select_nodes,
)
from trainctl.recovery.policy import (
    Action,
    AttemptView,
    Cause,
    Decision,
    NodeExit,
    NodeLost,
    classify_exits,
    decide,
    observe,
)

NODES = ("node-0", "node-1")
BUDGETS = Budgets(
    max_restarts=10,
    per_cause={"node_fault": 8, "worker_crash": 5, "software_error": 3, "hang": 3, "storage": 5},
    crash_loop_limit=3,
    exclude_s=3600.0,
    nodes=2,
    fewest_nodes=2,
)
LOST = Decision(
    Action.FAIL,
    "node-1: node agent lost",
    ExitCode.FAILED,
    blamed="node-1",
    cause=Cause.NODE_FAULT,
    signature="lost:node-1",
)


def decision_for(*observations: object) -> Decision:
    view = observe(AttemptView(nodes=NODES), list(observations))  # type: ignore[arg-type]
    return decide(10.0, view)


@pytest.mark.parametrize(
    ("exits", "cause", "blamed"),
    [
        # a Python exception of the script's own: a bug, nobody's node
        (
            [NodeExit("node-1", 1, 2.0, errors=("ValueError: bad shape",))],
            Cause.SOFTWARE_ERROR,
            None,
        ),
        # the peer only saw the connection drop, the killed worker wrote nothing: a crash
        (
            [
                NodeExit("node-0", 1, 1.0, errors=("RuntimeError: Connection closed by peer",)),
                NodeExit("node-1", 1, 1.5),
            ],
            Cause.WORKER_CRASH,
            None,
        ),
        # the checkpoint store failed under the script: storage trouble, nobody's node
        (
            [NodeExit("node-0", 1, 1.0, errors=("RestoreError: no checkpoint could be read",))],
            Cause.STORAGE,
            None,
        ),
        # torchrun itself killed by a signal, first in time
        (
            [NodeExit("node-0", -9, 1.0), NodeExit("node-1", 1, 2.0, errors=("KeyError: x",))],
            Cause.WORKER_CRASH,
            None,
        ),
    ],
)
def test_worker_failures_never_blame_a_node(
    exits: list[NodeExit], cause: Cause, blamed: str | None
) -> None:
    decision = decision_for(*exits)
    assert (decision.cause, decision.blamed) == (cause, blamed)


def test_software_error_signature_ignores_numbers() -> None:
    one = classify_exits([NodeExit("n", 1, 1.0, errors=("RuntimeError: failure at step 12",))])
    two = classify_exits([NodeExit("n", 1, 1.0, errors=("RuntimeError: failure at step 17",))])
    assert one.signature == two.signature


def test_lost_agent_is_a_node_fault_with_blame() -> None:
    decision = decision_for(NodeLost("node-1", 3.0))
    assert (decision.cause, decision.blamed) == (Cause.NODE_FAULT, "node-1")


def test_select_nodes_prefers_survivors_then_spares_then_readmitted() -> None:
    assert select_nodes(2, 2, ["node-0"], ["node-2"]).nodes == ("node-0", "node-2")  # type: ignore[union-attr]
    promoted = select_nodes(2, 2, ["node-0"], ["node-2", "node-3"])
    assert promoted is not None and promoted.promoted == ("node-2",) and not promoted.shrunk
    shrunk = select_nodes(2, 1, ["node-0"], [])
    assert shrunk is not None and shrunk.shrunk and shrunk.nodes == ("node-0",)
    assert select_nodes(2, 2, ["node-0"], []) is None
    back = select_nodes(2, 2, ["node-0"], [], ["node-1"])
    assert back is not None and back.nodes == ("node-0", "node-1")


def recover(decision: Decision, **kwargs: object) -> object:
    args: dict[str, object] = {
        "now": 100.0,
        "decision": decision,
        "budgets": BUDGETS,
        "restarts": {},
        "history": [],
        "committed_step": 10,
        "active": NODES,
        "waiting": (),
        "blocklist": {},
    }
    args.update(kwargs)
    return plan_recovery(**args)  # type: ignore[arg-type]


def test_node_fault_with_spare_promotes_it_and_excludes_the_node() -> None:
    recovery = recover(LOST, waiting=("node-2",))
    assert recovery.action is RecoveryAction.RELAUNCH  # type: ignore[attr-defined]
    assert recovery.selection.nodes == ("node-0", "node-2")  # type: ignore[attr-defined]
    (excluded,) = recovery.exclude  # type: ignore[attr-defined]
    assert (excluded.node, excluded.expires_at) == ("node-1", 3700.0)


def test_node_fault_without_spare_shrinks_to_min_nodes_or_requeues() -> None:
    shrink = recover(LOST, budgets=Budgets(**{**BUDGETS.__dict__, "fewest_nodes": 1}))
    assert shrink.selection.nodes == ("node-0",) and shrink.selection.shrunk  # type: ignore[attr-defined]
    requeue = recover(LOST)
    assert requeue.action is RecoveryAction.REQUEUE  # type: ignore[attr-defined]
    assert requeue.exit_code is ExitCode.FAILED  # type: ignore[attr-defined]
    assert "1 usable node(s), the job needs at least 2" in requeue.reason  # type: ignore[attr-defined]


def test_expired_exclusion_lets_the_node_back() -> None:
    old = Exclusion("node-1", "lost", "node_fault", 0.0, 50.0)
    crash = Decision(Action.FAIL, "crash", cause=Cause.WORKER_CRASH, signature="crash:node-0:-9")
    recovery = recover(crash, active=("node-0",), blocklist={"node-1": old})
    assert recovery.selection.nodes == ("node-0", "node-1")  # type: ignore[attr-defined]
    active = Exclusion("node-1", "lost", "node_fault", 0.0, 500.0)
    blocked = recover(crash, active=("node-0",), blocklist={"node-1": active})
    assert blocked.action is RecoveryAction.REQUEUE  # type: ignore[attr-defined]


def test_same_failure_with_no_new_checkpoint_is_a_crash_loop() -> None:
    bug = Decision(Action.FAIL, "ValueError", cause=Cause.SOFTWARE_ERROR, signature="software:V")
    same = [FailureRecord("software:V", 10), FailureRecord("software:V", 10)]
    gave_up = recover(bug, history=same)
    assert gave_up.action is RecoveryAction.GIVE_UP  # type: ignore[attr-defined]
    assert gave_up.exit_code is ExitCode.GAVE_UP  # type: ignore[attr-defined]
    assert "crash loop" in gave_up.reason  # type: ignore[attr-defined]
    # a new checkpoint between failures means progress: not a loop
    progress = [FailureRecord("software:V", 5), FailureRecord("software:V", 10)]
    assert recover(bug, history=progress).action is RecoveryAction.RELAUNCH  # type: ignore[attr-defined]
    assert crash_loop_length(progress, FailureRecord("software:V", 10)) == 2


def test_budgets_total_and_per_cause() -> None:
    crash = Decision(Action.FAIL, "crash", cause=Cause.WORKER_CRASH, signature="c")
    spent = recover(crash, restarts={"worker_crash": 5})
    assert spent.action is RecoveryAction.REQUEUE  # type: ignore[attr-defined]
    assert "recovery.restarts_per_cause.worker_crash=5" in spent.reason  # type: ignore[attr-defined]
    total = recover(crash, restarts={"node_fault": 6, "hang": 4})
    assert "launch.max_restarts=10" in total.reason  # type: ignore[attr-defined]
    bug = Decision(Action.FAIL, "bug", cause=Cause.SOFTWARE_ERROR, signature="b")
    assert recover(bug, restarts={"software_error": 3}).exit_code is ExitCode.GAVE_UP  # type: ignore[attr-defined]


def test_parse_fault() -> None:
    fault = parse_fault("kill-node:node-1@step=7")
    assert (fault.kind, fault.node, fault.step) == ("kill-node", "node-1", 7)
    outage = parse_fault("storage-outage@step=5,for=12")
    assert (outage.node, outage.duration_s) == (None, 12.0)
    assert outage.describe() == "storage-outage@step=5,for=12"
    for bad in ("explode:node-1@step=3", "kill-node@step=3", "kill-node:node-1", "hang:x@step=1"):
        with pytest.raises(UserError):
            parse_fault(bad)
