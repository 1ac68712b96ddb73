"""Pure node decisions, by tables: first selection, exclusions in force, the standby pool,
readmission after an exclusion, what a standby verdict means, and what a run asks its
scheduler for when it ends."""

from __future__ import annotations

import pytest

from trainctl.exitcodes import ExitCode
from trainctl.health.verdict import Verdict
from trainctl.recovery import placement
from trainctl.recovery.placement import (
    AfterRunAction,
    Exclusion,
    StandbyAction,
    after_run,
    excluded_now,
    expired,
    first_selection,
    judge_standby,
    pool,
    reprobe,
    standby,
)
from trainctl.recovery.policy import (
    Abandoned,
    Action,
    AttemptView,
    Decision,
    NodeExit,
    NodeLost,
    decide,
    node_outcome,
    observe,
)
from trainctl.state import NodeState

NOW = 1000.0
NAMES = ["node-0", "node-1", "node-2", "node-3"]


def out(node: str, until: float = NOW + 60) -> Exclusion:
    return Exclusion(node, f"{node} was bad", "node_fault", NOW - 10, until)


BLOCKLIST = {"node-1": out("node-1"), "node-3": out("node-3", until=NOW - 1)}


def test_exclusions_in_force_and_expired() -> None:
    assert excluded_now(BLOCKLIST, NOW) == {"node-1"}
    assert expired(BLOCKLIST, NOW) == ["node-3"]
    assert excluded_now(BLOCKLIST, NOW + 61) == set()
    assert expired({}, NOW) == []


@pytest.mark.parametrize(
    ("last", "blocklist", "want", "fewest", "nodes", "promoted", "shrunk"),
    [
        (None, {}, 2, 2, ("node-0", "node-1"), (), False),  # a fresh job
        (["node-0", "node-1"], {}, 2, 2, ("node-0", "node-1"), (), False),
        (["node-0", "node-1"], BLOCKLIST, 2, 2, ("node-0", "node-2"), ("node-2",), False),
        # after a requeue the allocation holds other nodes: only present ones count
        (["node-7", "node-1"], {}, 2, 2, ("node-1", "node-0"), ("node-0",), False),
        # an expired exclusion comes back last, and only when needed
        (
            ["node-0"],
            {"node-2": out("node-2"), "node-1": out("node-1", NOW - 5)},
            3,
            1,
            ("node-0", "node-3", "node-1"),
            ("node-3", "node-1"),
            False,
        ),
        (["node-0", "node-1"], {n: out(n) for n in NAMES[1:]}, 2, 1, ("node-0",), (), True),
    ],
)
def test_first_selection(
    last: list[str] | None,
    blocklist: dict[str, Exclusion],
    want: int,
    fewest: int,
    nodes: tuple[str, ...],
    promoted: tuple[str, ...],
    shrunk: bool,
) -> None:
    selection = first_selection(want, fewest, NAMES, last, blocklist, NOW)
    assert selection is not None
    assert (selection.nodes, selection.promoted, selection.shrunk) == (nodes, promoted, shrunk)


def test_first_selection_without_enough_nodes_is_none() -> None:
    everything_out = {n: out(n) for n in NAMES}
    assert first_selection(2, 1, NAMES, None, everything_out, NOW) is None
    assert first_selection(2, 2, NAMES[:1], None, {}, NOW) is None


def test_standby_and_pool() -> None:
    assert standby(NAMES, ("node-0",), BLOCKLIST, NOW) == ["node-2", "node-3"]
    assert pool(NAMES, ("node-0",), 1, BLOCKLIST, NOW) == ["node-0", "node-2"]
    assert pool(NAMES, ("node-0", "node-2"), 0, BLOCKLIST, NOW) == ["node-0", "node-2"]


@pytest.mark.parametrize(
    ("spares", "waiting", "up", "active", "chosen"),
    [
        (1, [], set(), ("node-0",), ["node-3"]),  # short of a spare: bring node-3 back
        (1, ["node-2"], set(), ("node-0",), []),  # the pool is full
        (1, [], {"node-3"}, ("node-0",), []),  # its agent already runs (being probed)
        (1, [], set(), ("node-3",), []),  # it is in the attempt
        (0, [], set(), ("node-0",), []),  # no spares wanted
    ],
)
def test_reprobe(
    spares: int, waiting: list[str], up: set[str], active: tuple[str, ...], chosen: list[str]
) -> None:
    nodes, reason = reprobe(spares, waiting, up, active, BLOCKLIST, NOW)
    assert nodes == chosen
    assert ("exclusion expired" in reason) == bool(chosen)


@pytest.mark.parametrize(
    ("status", "exclusion", "action"),
    [
        (Verdict.OK, None, StandbyAction.KEEP),
        (Verdict.DEGRADED, None, StandbyAction.KEEP),
        (Verdict.OK, out("node-2"), StandbyAction.KEEP),  # still excluded: stays out
        (Verdict.OK, out("node-2", NOW - 1), StandbyAction.READMIT),
        (Verdict.DEGRADED, out("node-2", NOW - 1), StandbyAction.READMIT),
        (Verdict.UNHEALTHY, None, StandbyAction.EXCLUDE),
        (Verdict.UNHEALTHY, out("node-2", NOW - 1), StandbyAction.EXCLUDE),
    ],
)
def test_judge_standby(status: Verdict, exclusion: Exclusion | None, action: StandbyAction) -> None:
    judgement = judge_standby("node-2", status, "gpu0: XID 79", exclusion, NOW, 300.0)
    assert judgement.action is action
    if action is StandbyAction.EXCLUDE:
        assert judgement.exclusion == Exclusion(
            "node-2", "node-2: UNHEALTHY on standby: gpu0: XID 79", "node_fault", NOW, NOW + 300
        )
    else:
        assert judgement.exclusion is None


@pytest.mark.parametrize(
    ("code", "blocklist", "drain", "action", "excluded"),
    [
        (ExitCode.FINISHED, BLOCKLIST, True, AfterRunAction.NONE, ()),
        (ExitCode.PREEMPTED, BLOCKLIST, False, AfterRunAction.REQUEUE, ()),
        (ExitCode.FAILED, BLOCKLIST, True, AfterRunAction.REQUEUE_EXCLUDING, ("node-1",)),
        (
            ExitCode.FAILED,
            {},
            False,
            AfterRunAction.NONE,
            (),
        ),  # nothing to exclude: the site decides
        (ExitCode.GAVE_UP, BLOCKLIST, False, AfterRunAction.NONE, ()),
        (ExitCode.BAD_INPUT, BLOCKLIST, False, AfterRunAction.NONE, ()),
    ],
)
def test_after_run(
    code: ExitCode,
    blocklist: dict[str, Exclusion],
    drain: bool,
    action: AfterRunAction,
    excluded: tuple[str, ...],
) -> None:
    decision = after_run(code, blocklist, NOW, drain)
    assert (decision.action, decision.excluded) == (action, excluded)
    assert decision.drain == (drain and action is AfterRunAction.REQUEUE_EXCLUDING)


def test_exclusion_entries_are_checked() -> None:
    entry = Exclusion.from_json("node-1", {"reason": "x", "since": 1, "expires_at": 2.5})
    assert entry == Exclusion("node-1", "x", "", 1.0, 2.5)
    with pytest.raises(ValueError, match=r"node-1\.expires_at"):
        Exclusion.from_json("node-1", {"expires_at": "tomorrow"})


def test_a_lost_lease_abandons_the_attempt_before_anything_else() -> None:
    view = observe(AttemptView(("node-0",)), [NodeLost("node-0", 1.0), Abandoned(2.0)])
    decision = decide(3.0, view)
    assert decision.action is Action.ABANDON and decision.exit_code == ExitCode.FAILED
    assert node_outcome("node-0", view, decision) == (NodeState.STOPPED, decision.reason)


@pytest.mark.parametrize(
    ("node", "state", "reason"),
    [
        ("node-0", NodeState.FAILED, "node-0: node agent lost"),  # blamed
        ("node-1", NodeState.FAILED, "node-1: torchrun ended with exit code 1"),
        ("node-2", NodeState.STOPPED, "stopped after another node failed"),
    ],
)
def test_node_outcomes_after_a_failure(node: str, state: NodeState, reason: str) -> None:
    view = observe(
        AttemptView(("node-0", "node-1", "node-2")),
        [NodeLost("node-0", 1.0), NodeExit("node-1", 1, 2.0), NodeExit("node-2", -9, 2.0, True)],
    )
    decision = decide(3.0, view)
    assert decision.blamed == "node-0"
    assert node_outcome(node, view, decision) == (state, reason)


def test_success_and_stop_outcomes() -> None:
    view = AttemptView(("node-0",))
    success = Decision(Action.SUCCEED, "every node finished")
    assert node_outcome("node-0", view, success) == (NodeState.SUCCEEDED, "")
    assert placement.standby(["node-0"], (), {}, NOW) == ["node-0"]
