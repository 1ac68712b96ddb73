"""Fencing: a superseded attempt's late writes never reach the job's checkpoints.

A node that was partitioned away (or frozen, then thawed) may still run workers of an attempt
the controller has already replaced: nothing can reach it to kill them. Before each attempt
starts, the controller writes the attempt's number to ``fence.json`` at the checkpoint root
(`advance`); every worker's checkpoint storage is a `FencedStorage` that reads it before any
write (an object, a manifest, a deletion) and refuses when a newer attempt holds the fence,
so an orphan can neither commit a checkpoint, nor overwrite one's objects, nor collect
garbage the new attempt needs. The fence only rises (a write of an older number is refused by
the writer too). Reads are not fenced: an orphan reading does no harm.

One small GET per write; a missing or unreadable fence does not block (a job whose controller
could not write it runs unfenced, as before fencing existed).
"""

from __future__ import annotations

import json

from trainctl.checkpoint.guarded import GuardedStorage
from trainctl.checkpoint.storage import Storage

FENCE_KEY = "fence.json"


class FencedError(RuntimeError):
    """A write by a superseded attempt (its message names both attempts)."""


def read_fence(storage: Storage) -> int | None:
    """The attempt that holds the fence (None: no fence, or unreadable)."""
    try:
        data = json.loads(bytes(storage.read(FENCE_KEY)))
        attempt = data.get("attempt") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None


def advance(storage: Storage, attempt: int) -> None:
    """Raise the fence to `attempt` (never lower it). Raises the storage's error on failure."""
    current = read_fence(storage)
    if current is not None and current > attempt:
        raise FencedError(f"the fence is at attempt {current}, later than {attempt}")
    storage.put(FENCE_KEY, json.dumps({"attempt": attempt}).encode())


class FencedStorage(GuardedStorage):
    """A worker's checkpoint storage: writes refused once a later attempt holds the fence."""

    def __init__(self, inner: Storage, attempt: int) -> None:
        super().__init__(inner)
        self.attempt = attempt

    def _check(self, write: bool) -> None:
        if not write:
            return
        holder = read_fence(self.inner)
        if holder is not None and holder > self.attempt:
            raise FencedError(
                f"fenced: attempt {self.attempt} was superseded by attempt {holder}; "
                "its writes to the checkpoints are refused"
            )
