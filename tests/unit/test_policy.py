"""The controller's pure decisions, with their reasons."""

from __future__ import annotations

import pytest

from trainctl.exitcodes import ExitCode
from trainctl.recovery.policy import (
    Action,
    AttemptView,
    Hang,
    NodeExit,
    NodeLost,
    NodeUnhealthy,
    SilentRank,
    StopRequested,
    decide,
    describe_hang,
    localise_hang,
    observe,
)

NODES = ("node-0", "node-1")


def run(*observations: object) -> tuple[Action, str, ExitCode | None]:
    view = observe(AttemptView(nodes=NODES), list(observations))  # type: ignore[arg-type]
    decision = decide(10.0, view)
    return decision.action, decision.reason, decision.exit_code


def test_table() -> None:
    assert run() == (Action.CONTINUE, "running", None)
    assert run(NodeExit("node-0", 0, 1.0)) == (Action.CONTINUE, "running", None)
    assert run(NodeExit("node-0", 0, 1.0), NodeExit("node-1", 0, 2.0)) == (
        Action.SUCCEED,
        "every node finished",
        ExitCode.FINISHED,
    )
    assert run(
        NodeExit("node-1", 1, 2.0, errors=("ValueError: x",)), NodeExit("node-0", -9, 1.0)
    ) == (Action.FAIL, "node-0: torchrun ended with signal 9", ExitCode.FAILED)
    assert run(NodeExit("node-1", 1, 2.0, errors=("ValueError: x",))) == (
        Action.FAIL,
        "node-1: torchrun ended with exit code 1 (ValueError: x)",
        ExitCode.FAILED,
    )
    assert run(NodeLost("node-1", 3.0)) == (Action.FAIL, "node-1: node agent lost", ExitCode.FAILED)
    assert run(StopRequested("SIGTERM", 1.0)) == (
        Action.STOP,
        "stop requested (SIGTERM)",
        ExitCode.PREEMPTED,
    )
    assert run(StopRequested("SIGINT", 1.0), NodeExit("node-0", 1, 2.0)) == (
        Action.STOP,
        "stop requested (SIGINT)",
        ExitCode.FAILED,
    )


def test_a_node_its_agent_stopped_unasked_left_the_job_and_lost_after_exit_is_ignored() -> None:
    # While the attempt runs, the controller asks nobody to stop: an agent that stopped its
    # torchrun on its own (it lost the controller, a signal told it to end) took its node out.
    stopped = NodeExit("node-0", -15, 1.0, stopped=True, reason="agent received SIGTERM")
    assert blame(stopped) == (
        Action.FAIL,
        "node-0: its agent stopped the node (agent received SIGTERM)",
        "node-0",
    )
    assert run(NodeExit("node-0", 0, 1.0), NodeLost("node-0", 2.0))[0] == Action.CONTINUE


def test_every_node_lost_at_once_blames_none() -> None:
    silent = "controller silent: silent for 1.9 s"
    both = (
        NodeExit("node-0", -9, 1.0, stopped=True, reason=silent),
        NodeLost("node-1", 1.2),
    )
    action, reason, blamed = blame(*both)
    assert (action, blamed) == (Action.FAIL, None)
    assert reason.startswith("every node was lost at once (node-0: its agent stopped the node")
    # One of two is that node's own loss.
    assert blame(NodeLost("node-1", 1.2, "agent silent for 1.9 s"))[1:] == (
        "node-1: agent silent for 1.9 s",
        "node-1",
    )


def test_observations_of_nodes_outside_the_attempt_are_ignored() -> None:
    assert run(NodeLost("node-7", 1.0))[0] == Action.CONTINUE


def blame(*observations: object) -> tuple[Action, str, str | None]:
    view = observe(AttemptView(nodes=NODES), list(observations))  # type: ignore[arg-type]
    decision = decide(10.0, view)
    return decision.action, decision.reason, decision.blamed


def test_unhealthy_node_is_a_node_fault_with_its_reason() -> None:
    xid = NodeUnhealthy(
        "node-1", 2.0, "preflight", "gpus: gpu1: XID 79 (GPU has fallen off the bus)"
    )
    assert blame(xid) == (
        Action.FAIL,
        "node-1: UNHEALTHY before joining: gpus: gpu1: XID 79 (GPU has fallen off the bus)",
        "node-1",
    )
    # The unhealthy agent then goes away on purpose: that is not a second fault.
    assert blame(xid, NodeLost("node-1", 3.0))[2] == "node-1"
    view = observe(AttemptView(nodes=NODES), [xid, NodeLost("node-1", 3.0)])
    assert view.lost == ()
    running = NodeUnhealthy("node-0", 5.0, "running", "host: disk /ckpt: 0.1 GiB free")
    assert blame(running)[1] == "node-0: UNHEALTHY while running: host: disk /ckpt: 0.1 GiB free"
    # The earliest verdict is blamed; a stop request still wins.
    assert blame(running, xid)[2] == "node-1"
    assert blame(xid, StopRequested("SIGTERM", 1.0))[0] == Action.STOP


def hang(*ranks: SilentRank) -> Hang:
    return Hang(20.0, 3.0, "hang timeout 3 s, pinned by the recipe", ranks)


HANG_TABLE = [
    # (silent ranks, blamed node, where the reason says it points)
    (
        (SilentRank(0, "node-0", 7, 3.2, "S"), SilentRank(1, "node-1", 7, 3.2, "T")),
        "node-1",
        "rank 1 on node-1 is stopped (state T)",
    ),
    (
        (SilentRank(0, "node-0", 7, 3.2, "S"), SilentRank(1, "node-1", 7, 3.2, "D")),
        "node-1",
        "rank 1 on node-1 is in uninterruptible sleep (state D)",
    ),
    (
        (SilentRank(0, "node-0", 8, 3.1, "S"), SilentRank(1, "node-1", 7, 3.9, "S")),
        "node-1",
        "rank 1 on node-1 stuck at step 7 while others reached step 8",
    ),
    (
        (SilentRank(0, "node-0", None, 601.0), SilentRank(1, "node-1", 3, 601.0)),
        "node-0",
        "rank 0 on node-0 stuck at no step while others reached step 3",
    ),
    # Every rank equally silent, no stopped process: not localised, nobody blamed.
    (
        (SilentRank(0, "node-0", 7, 3.2, "S"), SilentRank(1, "node-1", 7, 3.2, "S")),
        None,
        "not localised to one node",
    ),
    # Stopped ranks on two nodes: not one node's fault.
    (
        (SilentRank(0, "node-0", 7, 3.2, "T"), SilentRank(1, "node-1", 7, 3.2, "T")),
        None,
        "not localised to one node",
    ),
]


@pytest.mark.parametrize(("ranks", "blamed", "where"), HANG_TABLE)
def test_hang_blames_a_node_only_with_evidence(
    ranks: tuple[SilentRank, ...], blamed: str | None, where: str
) -> None:
    node, why = localise_hang(hang(*ranks))
    assert (node, why) == (blamed, where)
    action, reason, decided_blame = blame(hang(*ranks))
    assert action == Action.FAIL and decided_blame == blamed
    assert reason.startswith("hang: no progress for ")
    assert "hang timeout 3 s, pinned by the recipe" in reason and reason.endswith(where)


def test_hang_reason_names_ranks_nodes_and_silence() -> None:
    ranks = (SilentRank(1, "node-1", 7, 3.25, "T"), SilentRank(0, None, None, 3.0))
    assert describe_hang(hang(*ranks)) == (
        "hang: no progress for 3.2 s from rank(s) 1 (node-1), 0 (node unknown); "
        "hang timeout 3 s, pinned by the recipe; rank 1 on node-1 is stopped (state T)"
    )
