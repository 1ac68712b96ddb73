"""The controller's pure decisions, with their reasons."""

from __future__ import annotations

from trainctl.exitcodes import ExitCode
from trainctl.recovery.policy import (
    Action,
    AttemptView,
    NodeExit,
    NodeLost,
    StopRequested,
    decide,
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


def test_stopped_exits_are_not_failures_and_lost_after_exit_is_ignored() -> None:
    assert run(NodeExit("node-0", -15, 1.0, stopped=True))[0] == Action.CONTINUE
    assert run(NodeExit("node-0", 0, 1.0), NodeLost("node-0", 2.0))[0] == Action.CONTINUE
