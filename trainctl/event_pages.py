"""Which event files a reader needs, decided from their names alone (pure: no I/O, no clock).

Every event is one object named ``<time in µs, 17 digits>-<pid>-<seq>-<kind>.json`` (see
`trainctl.store.JobStore.append_event`): names sort by time, and carry the event's kind. So a
reader after the newest K events, a time window or some kinds lists the names (one listing,
no reads), keeps the ones that can match and opens only those — never all 100,000.

A name's time is the event's time truncated to the microsecond, so the name test is a superset
of the exact one: `EventQuery.admits` is applied again to each event once it is read. A name
that does not follow the pattern (written by hand, by another tool) cannot be judged and is
always read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trainctl.events import Event

NAME_KIND_CHARS = 40
"""How much of an event's kind its file name keeps (`file_kind`)."""


def file_kind(kind: str) -> str:
    """The kind as an event's file name spells it: ``[A-Za-z0-9_-]``, others as ``_``, at most
    `NAME_KIND_CHARS` characters (the same rule as `JobStore.append_event`)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in kind)[:NAME_KIND_CHARS]


@dataclasses.dataclass(frozen=True)
class EventName:
    """What an event file's name says: its time in microseconds and its kind."""

    name: str
    time_us: int
    kind: str


def parse_name(name: str) -> EventName | None:
    """The time and kind in an event file's name; None when it does not follow the pattern."""
    if not name.endswith(".json"):
        return None
    parts = name[: -len(".json")].split("-", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]) or not parts[3]:
        return None
    return EventName(name, int(parts[0]), parts[3])


def is_event_file(name: str) -> bool:
    """An event object (not a temporary file of a write in progress)."""
    return name.endswith(".json") and not name.startswith(".")


@dataclasses.dataclass(frozen=True)
class EventQuery:
    """Which events a reader wants: a time window (Unix times, both ends included), some kinds,
    and at most the newest `limit` of them (None: every one)."""

    since: float | None = None
    until: float | None = None
    kinds: frozenset[str] | None = None
    limit: int | None = None

    def admits(self, event: Event) -> bool:
        """The exact test, on an event that was read."""
        if self.since is not None and event.time < self.since:
            return False
        if self.until is not None and event.time > self.until:
            return False
        return self.kinds is None or event.kind in self.kinds

    def may_admit(self, parsed: EventName) -> bool:
        """Whether a file with this name can hold an admitted event (never False for one that
        `admits` would keep)."""
        if self.since is not None and parsed.time_us < int(self.since * 1e6):
            return False
        if self.until is not None and parsed.time_us > int(self.until * 1e6):
            return False
        return self.kinds is None or parsed.kind in {file_kind(k) for k in self.kinds}


@dataclasses.dataclass(frozen=True)
class Candidates:
    """The event files a query must look at: `named` in time order (by name), then `unnamed`
    (names that say nothing: always read)."""

    named: tuple[str, ...]
    unnamed: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.named) + len(self.unnamed)


def candidates(names: Sequence[str], query: EventQuery) -> Candidates:
    """The files among `names` (a directory listing, any order) that may hold events `query`
    admits, oldest first."""
    named: list[EventName] = []
    unnamed: list[str] = []
    for name in names:
        if not is_event_file(name):
            continue
        parsed = parse_name(name)
        if parsed is None:
            unnamed.append(name)
        elif query.may_admit(parsed):
            named.append(parsed)
    named.sort(key=lambda p: (p.time_us, p.name))
    return Candidates(tuple(p.name for p in named), tuple(sorted(unnamed)))


def tail_batches(num_named: int, limit: int, first: int | None = None) -> list[tuple[int, int]]:
    """Index ranges ``[low, high)`` of the named candidates to read, newest first, to find the
    newest `limit` events: the last `first` (default `limit`) names, then earlier ranges that
    double in size, for when some files turn out unreadable or, read, outside the window."""
    batches: list[tuple[int, int]] = []
    high, size = num_named, max(1, first if first is not None else limit)
    while high > 0:
        low = max(0, high - size)
        batches.append((low, high))
        high, size = low, size * 2
    return batches


def newest(events: Sequence[Event], limit: int | None) -> list[Event]:
    """`events` in time order, only the newest `limit` of them when a limit is given."""
    ordered = sorted(events, key=lambda e: e.time)
    return ordered if limit is None else ordered[max(0, len(ordered) - limit) :]
