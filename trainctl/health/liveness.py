"""Is a peer alive? A φ-accrual failure detector over heartbeat arrivals.

A node that dies silently (kernel panic, power loss, a switch or NIC failure, a host that stops
scheduling) never closes its TCP connection: no FIN, no RST, the controller sees nothing. So
controller and agents send each other a heartbeat every `interval_s` on the control connection,
and each side judges the other with the φ-accrual detector of Hayashibara et al. (2004), as
Akka and Cassandra do. It does not answer "dead or alive" with one fixed timeout: it learns the
distribution of heartbeat inter-arrival times from the peer itself and reports

    φ(t) = -log10 P(the next heartbeat arrives later than t after the last one)

under a normal distribution with the observed mean (plus an `acceptable_pause_s` allowance) and
standard deviation (never below `min_std_s`). The peer is *suspected* once φ reaches
`threshold`: with a threshold of 8, a healthy peer is wrongly suspected about once in 10^8
judgements of its own distribution. On a steady link (beats every 0.25 s, jitter under the
0.1 s floor, pause 1 s) that is a silence of about 1.8 s; on a loaded machine whose beats
arrive with more jitter it grows by itself. Pure: time comes in as `now`.

The judge's own pauses are not the peer's silence: `Liveness` only counts silence it was awake
to see (after the checker itself stalled — a long fsync, the GIL, a stopped controller — each
peer's silence is measured from the end of that stall).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Generic, TypeVar

Peer = TypeVar("Peer")


@dataclasses.dataclass(frozen=True)
class LivenessPolicy:
    interval_s: float = 0.25
    """How often each side sends a heartbeat."""
    threshold: float = 8.0
    """φ at which the peer is suspected (8: one wrong suspicion in about 10^8 judgements)."""
    acceptable_pause_s: float = 1.0
    """Added to the mean inter-arrival time: pauses this long are expected (GC, a busy core)."""
    min_std_s: float = 0.1
    """The standard deviation used is never below this (a perfectly regular link)."""
    window: int = 200
    """How many recent inter-arrival times the distribution is estimated from."""

    def describe(self) -> str:
        return (
            f"heartbeats every {self.interval_s:g} s, suspected at φ >= {self.threshold:g} "
            f"(acceptable pause {self.acceptable_pause_s:g} s)"
        )


BEATS_PER_S = 1024
"""What the controller's own beats to its agents may cost: at most this many a second."""


def scaled_interval(interval_s: float, nodes: int) -> float:
    """The heartbeat interval for a job of `nodes` nodes: `interval_s`, lengthened to
    `nodes / BEATS_PER_S` (1 s at 1,024 nodes, where 0.25 s was 4,096 beats a second each way
    on the controller's one loop). The detectors learn the interval they observe."""
    return max(interval_s, nodes / BEATS_PER_S)


CONTROLLER_BEATS_PER_S = 512
"""The controller's own beats to its agents, a second, in all."""


def controller_beat_interval(interval_s: float, nodes: int) -> float:
    """How often the controller beats to each agent of a `nodes`-node job: `interval_s`, or
    `nodes / CONTROLLER_BEATS_PER_S` (2 s at 1,024 nodes: a thousand sends a second were 8% of
    its CPU). Agents accept a 5 s pause of their controller (`controller_pause_s`) and learn the
    interval they observe, so this slows only how soon an agent notices a dead controller."""
    return max(interval_s, nodes / CONTROLLER_BEATS_PER_S)


PROGRESS_LINES_PER_S = 512
"""Progress lines a second the controller takes from all agents together, at most."""
PROGRESS_INTERVAL_S = 0.25
"""How often an agent forwards its workers' progress in a job of up to 128 nodes."""


def progress_interval(nodes: int, interval_s: float = PROGRESS_INTERVAL_S) -> float:
    """How often an agent of a `nodes`-node job forwards its workers' progress: every
    `interval_s`, lengthened to `nodes / PROGRESS_LINES_PER_S` (2 s at 1,024 nodes,
    8 s at 4,096). Reading and decoding progress lines was the largest share of the
    controller's CPU at 1,024 nodes; each line still carries every step's sample since the
    last one, so stragglers and hangs are judged on the same data, later by at most this."""
    return max(interval_s, nodes / PROGRESS_LINES_PER_S)


def phi(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """-log10 of the probability that a heartbeat comes more than `elapsed_s` after the last
    one, for normally distributed inter-arrival times (the logistic approximation of the normal
    tail Akka uses: finite and monotonic far into the tail)."""
    y = (elapsed_s - mean_s) / std_s
    exponent = -y * (1.5976 + 0.070566 * y * y)
    if exponent > 700:  # far before the mean: no suspicion at all (and exp would overflow)
        return 0.0
    e = math.exp(exponent)
    if elapsed_s > mean_s:
        return -math.log10(e / (1.0 + e)) if e > 0 else math.inf
    return -math.log10(1.0 - 1.0 / (1.0 + e))


PHI_AT_MEAN = -math.log10(0.5)
"""φ when the silence equals the expected interval (mean plus pause): about 0.301."""


class PhiAccrual:
    """One peer's heartbeat history and its φ."""

    def __init__(self, policy: LivenessPolicy, now: float) -> None:
        self.policy = policy
        self.last = now
        """When the latest heartbeat arrived (or the watch started)."""
        self.beats = 0
        # Bootstrapped as Akka does: two intervals around the expected one (std interval/4),
        # soon outweighed by what the peer really sends.
        first = policy.interval_s
        self.intervals: collections.deque[float] = collections.deque(maxlen=policy.window)
        # Running sums of the window (O(1) statistics: a controller judges every node's
        # detector several times a second; recomputing 200-sample statistics for 1,024 nodes
        # took most of its CPU).
        self._sum = 0.0
        self._squares = 0.0
        for interval in (first - first / 4, first + first / 4):
            self._learn(interval)

    def _learn(self, interval: float) -> None:
        if len(self.intervals) == self.intervals.maxlen:
            oldest = self.intervals[0]
            self._sum -= oldest
            self._squares -= oldest * oldest
        self.intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval

    def heartbeat(self, now: float) -> None:
        # A gap past the acceptable pause is not learned (as Cassandra does): it is a stall of
        # the judge or of the link, and learning it would blunt the detector for a long while.
        if self.last < now <= self.last + self.policy.interval_s + self.policy.acceptable_pause_s:
            self._learn(now - self.last)
        self.last = max(self.last, now)
        self.beats += 1

    def mean_s(self) -> float:
        """The mean inter-arrival time (the pause not included)."""
        return self._sum / len(self.intervals)

    def stats(self) -> tuple[float, float]:
        """(mean, standard deviation used) of the inter-arrival times."""
        count = len(self.intervals)
        mean = self._sum / count
        variance = max(0.0, self._squares / count - mean * mean)
        return mean, max(math.sqrt(variance), self.policy.min_std_s)

    def phi(self, now: float, since: float | None = None) -> float:
        """φ now; silence is counted from the later of the last heartbeat and `since`."""
        mean, std = self.stats()
        elapsed = now - max(self.last, since if since is not None else self.last)
        return phi(elapsed, mean + self.policy.acceptable_pause_s, std)

    def explain(self, now: float, since: float | None = None) -> str:
        mean, std = self.stats()
        silent = now - max(self.last, since if since is not None else self.last)
        return (
            f"silent for {silent:.2f} s (heartbeats every {mean:.3f} s ± {std:.3f}, "
            f"acceptable pause {self.policy.acceptable_pause_s:g} s; "
            f"φ {self.phi(now, since):.1f} >= {self.policy.threshold:g})"
        )


@dataclasses.dataclass(frozen=True)
class Silent(Generic[Peer]):
    """A suspected peer: when it was last heard (the judge's clock) and why it is suspected."""

    peer: Peer
    last_heard: float
    reason: str


class Liveness(Generic[Peer]):
    """The detectors of every watched peer, and the judge's own wakefulness."""

    def __init__(self, policy: LivenessPolicy) -> None:
        self.policy = policy
        self.detectors: dict[Peer, PhiAccrual] = {}
        self._last_check: float | None = None
        self._awake_since: float | None = None

    def watch(self, peer: Peer, now: float) -> None:
        """Start (or restart) judging `peer`, as if it had just been heard."""
        self.detectors[peer] = PhiAccrual(self.policy, now)

    def forget(self, peer: Peer) -> None:
        self.detectors.pop(peer, None)

    def heartbeat(self, peer: Peer, now: float) -> None:
        detector = self.detectors.get(peer)
        if detector is not None:
            detector.heartbeat(now)

    def last_heard(self, peer: Peer) -> float | None:
        detector = self.detectors.get(peer)
        return detector.last if detector is not None else None

    def check(self, now: float) -> list[Silent[Peer]]:
        """The suspected peers now. A gap since the previous check longer than the acceptable
        pause means the judge itself stalled: silence before its end is not counted."""
        if self._last_check is not None and now - self._last_check > self.policy.acceptable_pause_s:
            self._awake_since = now
        self._last_check = now
        suspected = []
        # φ is below -log10(1/2) until the silence passes the mean interval plus the
        # acceptable pause: a detector heard since then cannot be suspected, so it is skipped
        # without its statistics (most of them, at every check of a 1,024-node job).
        quick = self.policy.threshold > PHI_AT_MEAN
        since = self._awake_since if self._awake_since is not None else -math.inf
        pause = self.policy.acceptable_pause_s
        for peer, detector in self.detectors.items():
            silent_s = now - max(detector.last, since)
            if quick and silent_s <= detector.mean_s() + pause:
                continue
            if detector.phi(now, self._awake_since) >= self.policy.threshold:
                reason = detector.explain(now, self._awake_since)
                suspected.append(Silent(peer, detector.last, reason))
        return suspected
