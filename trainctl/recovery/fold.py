"""Folding per-node events: at most a few of a kind written one by one each window, the rest
written together as one `NodeEvents`.

An attempt's start makes three events a node (its agent up, its OK verdict, its torchrun
started), and its end one more (its torchrun stopped or finished). Each event is one object
in the store, written and synced on its own: at 4,096 nodes that was ~12,000 synced files at
every attempt start (and ~12,000 PUTs on S3), and the controller's one loop spent minutes on
them. A job of a few nodes sees every event as before (the first `KEEP_EACH` of a kind in a
window are written at once); past that, what arrives in the rest of the window is written as
one event listing the nodes and each one's data.

`Folder` decides and holds; the journal writes. Only routine per-node events are folded: a
verdict that is not OK, a failed exit, an exclusion are always their own event.
"""

from __future__ import annotations

import dataclasses
from typing import Any

WINDOW_S = 1.0
"""The window: at most `KEEP_EACH` events of a kind written one by one, then one fold."""
KEEP_EACH = 8
"""Events of a kind written one by one each window (a job of up to 8 nodes: all of them)."""


@dataclasses.dataclass(frozen=True)
class Held:
    """One event held for the window's fold."""

    time: float
    node: str
    attempt: int | None
    data: dict[str, Any]


@dataclasses.dataclass
class _Window:
    opened_at: float
    written: int = 0
    held: list[Held] = dataclasses.field(default_factory=list)


def admit(opened_at: float | None, written: int, now: float) -> tuple[bool, bool]:
    """(write this event on its own, open a new window) for an event at `now` (monotonic),
    given its kind's window (opened at `opened_at`, None: none yet) and how many of the kind
    that window wrote one by one."""
    if opened_at is None or now - opened_at >= WINDOW_S:
        return True, True
    return written < KEEP_EACH, False


def routine_exit(code: int, stopped: bool, errors: int, crashes: int) -> bool:
    """Whether a node's exit may be folded: stopped (by the controller, or on its own) or
    finished (0), with no error file and no crash evidence. A failure is its own event."""
    return (stopped or code == 0) and not errors and not crashes


class Folder:
    """Per kind, the current window and the events held for its fold."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def admit(self, kind: str, now: float) -> bool:
        """Whether an event of `kind` at `now` (monotonic) is written now, on its own; if not,
        `hold` it. A new window starts when the last one is over (its fold taken first by
        `due`, or here)."""
        window = self._windows.get(kind)
        write, reopen = admit(None if window is None else window.opened_at, _written(window), now)
        if reopen:
            if window is not None and window.held:
                return False  # the last window's fold is not written yet: join it
            window = self._windows[kind] = _Window(now)
        assert window is not None
        if write:
            window.written += 1
        return write

    def hold(self, kind: str, held: Held) -> None:
        self._windows[kind].held.append(held)

    def due(self, now: float, every: bool = False) -> list[tuple[str, list[Held]]]:
        """The folds to write now (windows over, or `every` one): (kind, held events)."""
        out = []
        for kind, window in self._windows.items():
            if window.held and (every or now - window.opened_at >= WINDOW_S):
                out.append((kind, window.held))
                window.held = []
        return out


def _written(window: _Window | None) -> int:
    return 0 if window is None else window.written
