"""A memory-tier holder's pacing: how often it looks at its folders and how long its
replication rounds rest (`trainctl.checkpoint.holder` runs them), as constants and pure
decisions."""

from __future__ import annotations

TICK_S = 0.02
"""How often the holder looks for new slot records (a look costs a few `stat` calls when no
folder changed since the last one)."""
FULL_LOOK_S = 1.0
"""A tick reads every folder at least this often, changed or not."""
FRESH_S = 0.05
"""A folder modified less than this long ago is read again at the next tick (`folders_stamp`)."""
DUTY = 0.1
"""The fraction of one core the holder's background work (summing and sending a step) may use:
after a round that took T seconds of this thread's CPU the next starts T x (1 - DUTY) / DUTY
seconds later, one round at a time. CPU, not wall time: the bandwidth pauses use no core, and a
round preempted by the training would otherwise rest longer for it. The cores belong to the
training: unpaced, two holders summing and sending every step took ~30 ms of each 50 ms step on
a 2-core host. A replica restores a lost node only while it is at most one step behind (the
surviving ranks keep their two newest steps), so T / DUTY must stay within about a step: at
tiny-gpt's default (6 MB a rank, ~40 ms steps) a round is a few ms of CPU. The receiving
holder's work (writing and summing what lands) follows the sender's pace."""
BANDWIDTH = 1e9
"""Bytes/s one holder sends to its peers at most (replication must leave the network to the
durable tier's uploads and the training's collectives)."""
RECATALOG_S = 1.0
"""A sender asks a peer for its catalog of what it holds at least this often; in between it
trusts what its own puts left there (`_Known`): a catalog request and its parse cost more than
a millisecond of both holders' CPU per step."""


def pause_after(work_s: float, duty: float, done: bool) -> float:
    """Seconds to rest after a replication round that worked `work_s` seconds, so the rounds
    use at most `duty` of one core; a failed round (`done` False) rests at least a tick before
    it tries again (pure)."""
    rest = max(work_s, 0.0) * (1.0 - duty) / duty if 0.0 < duty < 1.0 else 0.0
    return rest if done else max(rest, TICK_S)


def tick_delay(now: float, resting_until: float, replicating: bool) -> float:
    """Seconds until the next tick (pure): a holder without ring peers only collects garbage,
    every `FULL_LOOK_S`; one whose replication round is resting until `resting_until` (its duty
    pause) has nothing to hand over before then, so it looks at the end of the pause (a look
    costs ~0.2 ms, and every tick while a worker writes a record a step is a full one); else
    every `TICK_S`."""
    if not replicating:
        return FULL_LOOK_S
    return min(FULL_LOOK_S, max(TICK_S, resting_until - now))
