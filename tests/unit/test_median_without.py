"""`median_without`: the median of a sorted multiset with some of it taken out, exactly as
`statistics.median` of what is left (straggler detection at 1,024 nodes relies on it)."""

from __future__ import annotations

import random
import statistics

import pytest

from trainctl.health.progress import median_without


@pytest.mark.parametrize(
    ("values", "removed", "expected"),
    [
        ([1.0, 2.0, 3.0], [2.0], 2.0),
        ([1.0, 2.0, 3.0], [1.0], 2.5),
        ([1.0, 1.0, 1.0, 5.0], [1.0], 1.0),
        ([1.0, 2.0, 2.0, 9.0], [2.0, 9.0], 1.5),
    ],
)
def test_table(values: list[float], removed: list[float], expected: float) -> None:
    assert median_without(values, removed) == expected


def test_matches_statistics_median_with_ties() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        values = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(2, 40))]
        removed = rng.sample(values, rng.randint(1, len(values) - 1))
        rest = list(values)
        for value in removed:
            rest.remove(value)
        assert median_without(sorted(values), sorted(removed)) == statistics.median(rest)


def test_nothing_left_is_an_error() -> None:
    with pytest.raises(statistics.StatisticsError):
        median_without([1.0], [1.0])


def test_one_removed_matches_statistics_median_at_every_position() -> None:
    """One value taken out (a member's own step, the straggler check's common case, which
    takes a single bisection): every position of it, with ties, odd and even lengths."""
    rng = random.Random(11)
    for _ in range(500):
        values = sorted(rng.choice([0.5, 1.0, 1.0, rng.random()]) for _ in range(rng.randint(2, 9)))
        for index, value in enumerate(values):
            rest = values[:index] + values[index + 1 :]
            assert median_without(values, [value]) == statistics.median(rest)
