"""The φ-accrual detector, driven by tables of arrival times (no clock, no sockets)."""

from __future__ import annotations

import random

import pytest

from trainctl.health.liveness import (
    PHI_AT_MEAN,
    Liveness,
    LivenessPolicy,
    PhiAccrual,
    phi,
    scaled_interval,
)

POLICY = LivenessPolicy(interval_s=0.25, threshold=8.0, acceptable_pause_s=1.0, min_std_s=0.1)


def steady(beats: int = 40, interval: float = 0.25) -> PhiAccrual:
    detector = PhiAccrual(POLICY, 0.0)
    for i in range(1, beats + 1):
        detector.heartbeat(i * interval)
    return detector


def silence_to_suspicion(detector: PhiAccrual) -> float:
    """Seconds of silence after the last beat until φ reaches the threshold (0.01 s steps)."""
    silent = 0.0
    while detector.phi(detector.last + silent) < POLICY.threshold:
        silent += 0.01
    return silent


def test_phi_grows_with_silence_and_is_finite_and_monotonic() -> None:
    values = [phi(t / 10, 1.25, 0.1) for t in range(0, 40)]
    assert values == sorted(values)
    assert values[0] == 0.0 and values[-1] > 100
    assert phi(-1e6, 1.25, 0.1) == 0.0  # far before the mean: no overflow


def test_a_steady_link_is_suspected_after_about_1_8_s_of_silence() -> None:
    detector = steady()
    assert detector.phi(detector.last + 1.0) < 1
    assert 1.6 < silence_to_suspicion(detector) < 2.0


def test_jittery_beats_widen_the_silence_the_detector_accepts() -> None:
    calm, noisy = steady(), PhiAccrual(POLICY, 0.0)
    for i in range(1, 41):  # every 0.05 s or 0.65 s: std 0.3 s
        noisy.heartbeat(noisy.last + (0.05 if i % 2 else 0.65))
    assert silence_to_suspicion(noisy) > silence_to_suspicion(calm) + 1.0
    # Beats that come late now and then (a busy core) are learned, not suspected.
    detector = PhiAccrual(POLICY, 0.0)
    now = 0.0
    for i in range(200):
        now += 1.2 if i % 10 == 0 else 0.25
        detector.heartbeat(now)
        assert detector.phi(now + 1.2) < POLICY.threshold


def test_liveness_reports_only_silent_peers_with_a_reason() -> None:
    live: Liveness[str] = Liveness(POLICY)
    live.watch("node-0", 0.0)
    live.watch("node-1", 0.0)
    now = 0.0
    for _ in range(20):
        now += 0.25
        live.heartbeat("node-0", now)
        live.heartbeat("node-1", now)
        assert live.check(now) == []
    last_of_node_1 = now
    for _ in range(12):  # 3 s: node-0 keeps beating, node-1 is silent
        now += 0.25
        live.heartbeat("node-0", now)
        found = live.check(now)
    assert [s.peer for s in found] == ["node-1"]
    assert found[0].last_heard == last_of_node_1
    assert found[0].reason.startswith("silent for 3.00 s (heartbeats every 0.250 s")
    live.forget("node-1")
    assert live.check(now) == []


def test_the_judges_own_stall_is_not_the_peers_silence() -> None:
    live: Liveness[str] = Liveness(POLICY)
    live.watch("node-0", 0.0)
    now = 0.0
    for _ in range(20):
        now += 0.25
        live.heartbeat("node-0", now)
        live.check(now)
    # The judge stalls for 10 s (its beats queued in the socket, unread): on waking it does
    # not convict, and the peer gets its full allowance counted from the wake-up.
    now += 10.0
    assert live.check(now) == []
    assert live.check(now + 1.0) == []
    live.heartbeat("node-0", now + 1.05)
    assert live.check(now + 1.1) == []
    # The 11 s gap was not learned as an interval (it would blunt the detector for minutes).
    assert live.detectors["node-0"].stats()[0] < 0.3
    # A silence the judge was awake for (checking every 0.1 s) is convicted.
    checks = [now + 1.1 + 0.1 * i for i in range(1, 30)]
    convicted = next(t for t in checks if live.check(t))
    assert 1.6 < convicted - (now + 1.05) < 2.0


@pytest.mark.parametrize("threshold", [4.0, 8.0, 12.0])
def test_a_higher_threshold_waits_longer(threshold: float) -> None:
    policy = LivenessPolicy(threshold=threshold)
    detector = PhiAccrual(policy, 0.0)
    for i in range(1, 41):
        detector.heartbeat(i * 0.25)
    suspicion = next(t / 100 for t in range(1000) if detector.phi(10.0 + t / 100) >= threshold)
    assert 1.25 < suspicion < 1.25 + 0.1 * 7


@pytest.mark.parametrize(
    ("interval_s", "nodes", "scaled_s"),
    [(0.25, 1, 0.25), (0.25, 256, 0.25), (0.25, 512, 0.5), (0.25, 1024, 1.0), (2.0, 1024, 2.0)],
)
def test_the_heartbeat_interval_grows_with_the_node_count(
    interval_s: float, nodes: int, scaled_s: float
) -> None:
    assert scaled_interval(interval_s, nodes) == scaled_s


@pytest.mark.parametrize("threshold", [0.1, PHI_AT_MEAN, 0.5, 3.0, 8.0])
def test_check_suspects_exactly_the_peers_whose_phi_reaches_the_threshold(threshold: float) -> None:
    """`Liveness.check` skips a detector heard within its mean interval plus the pause (φ is
    below the threshold there): the peers it reports are exactly those whose φ, computed for
    every detector, reaches the threshold — whatever the jitter, the silence, the judge's stall."""
    rng = random.Random(5)
    for _ in range(40):
        policy = LivenessPolicy(
            interval_s=rng.choice([0.25, 1.0]),
            threshold=threshold,
            acceptable_pause_s=rng.choice([0.0, 0.5, 1.0]),
        )
        liveness: Liveness[int] = Liveness(policy)
        for peer in range(30):
            liveness.watch(peer, 0.0)
            now = 0.0
            for _ in range(rng.randint(0, 20)):
                now += policy.interval_s * rng.uniform(0.5, 1.5)
                liveness.heartbeat(peer, now)
        for now in sorted(rng.uniform(0.0, 40.0) for _ in range(5)):
            since = liveness._awake_since  # what check() will count silence from
            stalled = liveness._last_check is not None and (
                now - liveness._last_check > policy.acceptable_pause_s
            )
            since = now if stalled else since
            expected = {
                peer
                for peer, detector in liveness.detectors.items()
                if detector.phi(now, since) >= threshold
            }
            assert {s.peer for s in liveness.check(now)} == expected
