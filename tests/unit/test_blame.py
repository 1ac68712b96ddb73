"""Conclusions after an attempt ended: repeat offenders and deterministic errors (tables)."""

from __future__ import annotations

from tests.unit.test_recovery_policy import BUDGETS
from trainctl.recovery.blame import FailureRecord, RepeatPolicy, conclude
from trainctl.recovery.placement import RecoveryAction, plan_recovery
from trainctl.recovery.policy import (
    Action,
    AttemptView,
    Cause,
    NodeExit,
    decide,
    observe,
)

NODES = ("node-0", "node-1")
KILLED = ("local rank 0 (pid 7) killed by SIGKILL",)
PEER = "RuntimeError: Connection closed by peer [127.0.0.1]:1234"
REPEAT = RepeatPolicy(crashes=2, window_s=3600)


def view(*exits: NodeExit) -> AttemptView:
    return observe(AttemptView(nodes=NODES), list(exits))


def crash_on(node: str, at: float = 1.0) -> AttemptView:
    other = "node-0" if node == "node-1" else "node-1"
    return view(NodeExit(node, 1, at, crashes=KILLED), NodeExit(other, 1, at + 0.1, errors=(PEER,)))


def test_a_worker_crash_names_its_only_suspect_but_blames_nobody() -> None:
    decision = decide(2.0, crash_on("node-1"))
    assert (decision.cause, decision.blamed, decision.suspect) == (
        Cause.WORKER_CRASH,
        None,
        "node-1",
    )
    assert decision.reason == "node-1: torchrun ended with exit code 1 (" + KILLED[0] + ")"
    both = view(NodeExit("node-0", 1, 1.0, crashes=KILLED), NodeExit("node-1", -9, 1.1))
    assert decide(2.0, both).suspect is None  # both crashed: the job's, not a node's


def test_the_second_crash_on_the_same_node_blames_it() -> None:
    first = decide(2.0, crash_on("node-1"))
    earlier = [FailureRecord.of(first, 10, 100.0)]
    assert earlier[0].node == "node-1" and earlier[0].cause == "worker_crash"
    second = decide(2.0, crash_on("node-1"))
    concluded = conclude(second, crash_on("node-1"), True, earlier, 200.0, REPEAT)
    assert (concluded.cause, concluded.blamed) == (Cause.NODE_FAULT, "node-1")
    assert concluded.reason.startswith("node-1: its workers died of a signal 2 times within 60")
    # ... and recovery excludes it.
    recovery = plan_recovery(200.0, concluded, BUDGETS, {}, earlier, 10, NODES, ["node-2"], {})
    assert [e.node for e in recovery.exclude] == ["node-1"]
    assert recovery.selection is not None and recovery.selection.nodes == ("node-0", "node-2")


def test_crashes_on_different_nodes_or_outside_the_window_blame_nobody() -> None:
    on_0 = FailureRecord.of(decide(2.0, crash_on("node-0")), 10, 100.0)
    second = decide(2.0, crash_on("node-1"))
    assert conclude(second, crash_on("node-1"), True, [on_0], 200.0, REPEAT) == second
    old = FailureRecord("crash:1", 10, "worker_crash", "node-1", 100.0)
    assert conclude(second, crash_on("node-1"), True, [old], 100.0 + 3601, REPEAT) == second
    # A software error on the same node twice is never the node's.
    bug = FailureRecord("software:V", 10, "software_error", None, 100.0)
    assert conclude(second, crash_on("node-1"), True, [bug], 200.0, REPEAT) == second


def test_an_old_store_s_failures_still_read() -> None:
    old = FailureRecord.from_json({"signature": "crash:1", "committed_step": 5})
    assert old == FailureRecord("crash:1", 5, "", None, 0.0)


def test_the_same_exception_everywhere_before_the_first_step_is_deterministic() -> None:
    error = "ValueError: invalid literal for int() with base 10: 'many'"
    everywhere = view(
        NodeExit("node-0", 1, 1.0, errors=(error,)), NodeExit("node-1", 1, 1.1, errors=(error,))
    )
    decision = decide(2.0, everywhere)
    assert decision.cause is Cause.SOFTWARE_ERROR
    concluded = conclude(decision, everywhere, False, [], 2.0, REPEAT)
    assert concluded.deterministic and "deterministic, not retried" in concluded.reason
    recovery = plan_recovery(2.0, concluded, BUDGETS, {}, [], None, NODES, [], {})
    assert recovery.action is RecoveryAction.GIVE_UP and int(recovery.exit_code or 0) == 3
    # After a step, or on one node while another failed otherwise, it is retried.
    assert not conclude(decision, everywhere, True, [], 2.0, REPEAT).deterministic
    mixed = view(NodeExit("node-0", 1, 1.0, errors=(error,)), NodeExit("node-1", -11, 1.1))
    assert not conclude(decide(2.0, mixed), mixed, False, [], 2.0, REPEAT).deterministic
    other = view(
        NodeExit("node-0", 1, 1.0, errors=(error,)),
        NodeExit("node-1", 1, 1.1, errors=("KeyError: 'lr'",)),
    )
    assert not conclude(decide(2.0, other), other, False, [], 2.0, REPEAT).deterministic
    assert decide(2.0, other).action is Action.FAIL


def test_the_crash_is_pinned_on_the_node_whose_worker_died_whatever_reported_first() -> None:
    # The peer's broken connection often reports first (its collective fails at once, while
    # torchrun on the crashed node notices its dead worker a monitor interval later), and the
    # crashed node's report comes after the stop, marked stopped but with the crash evidence
    # its agent read from before the stop.
    peer_first = view(
        NodeExit("node-0", 1, 1.0, errors=(PEER,)),
        NodeExit("node-1", -9, 1.2, stopped=True, crashes=KILLED),
    )
    decision = decide(2.0, observe(AttemptView(nodes=NODES), [peer_first.exits[0]]))
    assert decision.cause is Cause.WORKER_CRASH and decision.suspect is None
    earlier = [FailureRecord("crash:1", 10, "worker_crash", "node-1", 100.0)]
    concluded = conclude(decision, peer_first, True, earlier, 200.0, REPEAT)
    assert (concluded.blamed, concluded.cause) == ("node-1", Cause.NODE_FAULT)
    assert KILLED[0] in concluded.reason
    # What the stop itself killed (SIGKILL, no evidence from before it) is no crash.
    stopped = view(
        NodeExit("node-0", 1, 1.0, errors=(PEER,)), NodeExit("node-1", -9, 1.2, stopped=True)
    )
    assert conclude(decision, stopped, True, earlier, 200.0, REPEAT).blamed is None
