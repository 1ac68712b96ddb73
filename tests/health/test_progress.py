"""Tables for the pure progress detectors: hang timeout, hangs, stragglers."""

from __future__ import annotations

import pytest

from trainctl.health.progress import (
    StragglerPolicy,
    derive_hang_timeout,
    detect_hang,
    detect_stragglers,
    node_step_times,
    quantile,
)
from trainctl.health.verdict import Verdict


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0], 0.99, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 1.0, 4.0),
        ([1.0, 2.0], 0.0, 1.0),
    ],
)
def test_quantile(values: list[float], q: float, expected: float) -> None:
    assert quantile(values, q) == pytest.approx(expected)


def test_quantile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


HANG_TABLE = [
    # (step_times, kwargs, timeout, explanation)
    (
        [],
        {},
        600.0,
        "hang timeout 600 s = max(floor 60 s, first-step allowance 600 s): "
        "no step has finished yet",
    ),
    (
        [],
        {"first_step_allowance_s": 30.0},
        60.0,
        "hang timeout 60 s = max(floor 60 s, first-step allowance 30 s): no step has finished yet",
    ),
    (
        [0.5] * 99 + [2.0],
        {},
        60.0,
        "hang timeout 60 s = max(floor 60 s, 5 × p99 step time 0.515 s = 2.58 s) over 100 steps",
    ),
    (
        [20.0] * 10,
        {},
        100.0,
        "hang timeout 100 s = max(floor 60 s, 5 × p99 step time 20 s = 100 s) over 10 steps",
    ),
    (
        [20.0] * 10,
        {"saving_checkpoint": True},
        400.0,
        "hang timeout 400 s = max(floor 60 s, 5 × p99 step time 20 s = 100 s) over 10 steps "
        "+ checkpoint allowance 300 s (save in progress)",
    ),
    (
        [1.0, 3.0],
        {"floor_s": 1.0, "k": 2.0, "q": 0.5},
        4.0,
        "hang timeout 4 s = max(floor 1 s, 2 × p50 step time 2 s = 4 s) over 2 steps",
    ),
    (
        [20.0] * 10,
        {"pinned_s": 45.0, "saving_checkpoint": True},
        345.0,
        "hang timeout 45 s, pinned by the recipe, + checkpoint allowance 300 s (save in progress)",
    ),
    (
        [20.0] * 10,
        {"pinned_s": 45.0, "saving_checkpoint": True, "checkpoint_allowance_s": 0.0},
        45.0,
        "hang timeout 45 s, pinned by the recipe",
    ),
    (
        [20.0] * 10,
        {"pinned_s": 45.0},
        45.0,
        "hang timeout 45 s, pinned by the recipe",
    ),
]


@pytest.mark.parametrize(("step_times", "kwargs", "timeout", "explanation"), HANG_TABLE)
def test_derive_hang_timeout_table(
    step_times: list[float], kwargs: dict, timeout: float, explanation: str
) -> None:
    derived = derive_hang_timeout(step_times, **kwargs)
    assert derived.timeout_s == pytest.approx(timeout)
    assert derived.explanation == explanation
    assert derived == (derived.timeout_s, derived.explanation)  # a plain tuple for callers


def test_derive_hang_timeout_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="pinned"):
        derive_hang_timeout([], pinned_s=0.0)
    with pytest.raises(ValueError, match="negative"):
        derive_hang_timeout([1.0], floor_s=-1.0)


def test_detect_hang_lists_only_silent_members_longest_first() -> None:
    last = {0: 100.0, 1: 95.0, 2: 70.0, 3: 60.0, 4: 50.0}
    hung = detect_hang(now=100.0, last_progress_by_member=last, timeout_s=30.0)
    # rank 2 is silent exactly for the timeout: not yet hung
    assert [(h.member, h.silent_s) for h in hung] == [(4, 50.0), (3, 40.0)]
    assert hung[1].reason == "3: no progress for 40.0 s (hang timeout 30 s)"
    # exactly at the timeout is not yet a hang; just past it is
    assert detect_hang(130.0, {"node-a": 100.0}, 30.0) == []
    assert [h.member for h in detect_hang(130.5, {"node-a": 100.0}, 30.0)] == ["node-a"]
    assert detect_hang(0.0, {}, 30.0) == []


def test_straggler_flagged_degraded_with_numbers() -> None:
    times = {
        "node0": [1.0] * 20,
        "node1": [1.02] * 20,
        "node2": [1.6] * 19 + [0.9],
    }
    verdicts = detect_stragglers(times, StragglerPolicy(factor=1.2, window=20, min_fraction=0.8))
    assert [verdicts[n].status for n in ("node0", "node1", "node2")] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.DEGRADED,
    ]
    assert verdicts["node2"].reason == (
        "straggler: median step 1.6 s vs 1.01 s for the others (1.58×); "
        "slower than 1.2× in 19 of 20 steps"
    )
    assert verdicts["node2"].evidence == {
        "median_step_s": 1.6,
        "others_median_step_s": pytest.approx(1.01),
        "ratio": pytest.approx(1.6 / 1.01),
        "slow_steps": 19,
        "window_steps": 20,
        "factor": 1.2,
        "min_fraction": 0.8,
    }


STRAGGLER_TABLE = [
    # (times, policy, expected statuses by member)
    (
        {"a": [1.0] * 10, "b": [2.0] * 10},
        StragglerPolicy(window=10),
        {"a": Verdict.OK, "b": Verdict.DEGRADED},
    ),  # two nodes: compared with each other
    (
        {"a": [1.0] * 10, "b": [1.1] * 10},
        StragglerPolicy(window=10),
        {"a": Verdict.OK, "b": Verdict.OK},
    ),  # within the factor
    (
        {"a": [1.0] * 10, "b": [1.0] * 5 + [3.0] * 5},
        StragglerPolicy(window=10),
        {"a": Verdict.OK, "b": Verdict.OK},
    ),  # slow half the time: not consistent
    (
        {"a": [1.0] * 10, "b": [1.0] * 5 + [3.0] * 5},
        StragglerPolicy(window=5),
        {"a": Verdict.OK, "b": Verdict.DEGRADED},
    ),  # the recent window is what counts
    (
        {"a": [1.0] * 3, "b": [9.0] * 3},
        StragglerPolicy(),
        {"a": Verdict.OK, "b": Verdict.OK},
    ),  # too few steps to judge
    ({"a": [1.0] * 30}, StragglerPolicy(), {"a": Verdict.OK}),  # one member: nothing to compare
    ({}, StragglerPolicy(), {}),
]


@pytest.mark.parametrize(("times", "policy", "expected"), STRAGGLER_TABLE)
def test_straggler_table(times: dict, policy: StragglerPolicy, expected: dict) -> None:
    assert {m: v.status for m, v in detect_stragglers(times, policy).items()} == expected


def test_too_early_reason_says_what_is_missing() -> None:
    verdicts = detect_stragglers({"a": [1.0] * 3, "b": [1.0] * 4})
    assert verdicts["a"].reason == (
        "not enough data to judge stragglers: 2 members, 3 common steps "
        "(need 2 members and 5 steps)"
    )


def test_node_step_times_take_the_slowest_rank_aligned_at_the_end() -> None:
    by_rank = {0: [1.0, 1.0, 1.0], 1: [9.0, 2.0, 1.5], 2: [1.0, 1.0], 3: [1.1, 0.9]}
    nodes = {0: "n0", 1: "n0", 2: "n1", 3: "n1"}
    assert node_step_times(by_rank, nodes) == {"n0": [9.0, 2.0, 1.5], "n1": [1.1, 1.0]}
