"""Reading a job's events at 100,000: the newest page, a stream, or every one in one fast pass.

`JobStore.read_events` opens and fully validates every event file; fine for a few hundred, not
for a week-old job with 100,000 (5 s, all of it in memory). Here:

- `read_page`: the events a query admits (`trainctl.event_pages.EventQuery`), by default the
  newest few hundred: one listing, then only the files whose names can match, newest first
  (`event_pages.candidates`, `tail_batches`);
- `stream`: every admitted event in time order, a batch of files at a time, never all in memory;
- `read_all`: every event in one pass for the goodput ledger and `top`, where only the kinds
  the caller interprets (`typed`) are validated against their schema; the others keep their
  checked envelope (time, kind, node, attempt) and their raw data (`events.envelope_from_json`).

Local files are read with plain ``os.read``; on an object store a batch is fetched concurrently
(fsspec's ``cat`` of many paths) instead of one GET after another.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

from trainctl.event_pages import (
    EventQuery,
    candidates,
    is_event_file,
    newest,
    tail_batches,
)
from trainctl.events import BadEvent, Event, envelope_from_json
from trainctl.store import EventLog, JobStore, Problem, join

STREAM_BATCH = 2000
"""Event files read at a time by `stream`."""


@dataclasses.dataclass(frozen=True)
class EventPage:
    """The events a query admitted, in time order; the files skipped; how many event files
    could hold an admitted event by their names; and whether older ones were left out."""

    events: list[Event]
    problems: list[Problem]
    num_candidates: int
    truncated: bool


def events_dir(store: JobStore, job_id: str) -> str:
    return join(store.job_url(job_id), "events")


def list_names(store: JobStore, job_id: str) -> list[str]:
    """The job's event file names (one listing; nothing is read)."""
    return [n for n in store.files.list(events_dir(store, job_id)) if is_event_file(n)]


def read_raw(store: JobStore, urls: Sequence[str]) -> list[tuple[str, bytes]]:
    """The bytes of each of `urls` that still exists, in order (a file removed since the listing
    is left out). Storage trouble raises the store's `StorageError`."""
    if not urls:
        return []
    if store.local:
        found: list[tuple[str, bytes]] = []
        for url in urls:
            try:
                fd = os.open(url, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as error:
                store.files.fail(error, url, "read")
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
            finally:
                os.close(fd)
            found.append((url, b"".join(chunks)))
        return found
    fs = store.files.fs
    try:
        fetched = fs.cat(list(urls), on_error="return")
    except Exception as error:
        store.files.fail(error, urls[0], "read")
    by_path = {fs._strip_protocol(path): value for path, value in fetched.items()}
    out: list[tuple[str, bytes]] = []
    for url in urls:
        value = by_path.get(fs._strip_protocol(url))
        if isinstance(value, FileNotFoundError) or value is None:
            continue
        if isinstance(value, BaseException):
            store.files.fail(value if isinstance(value, Exception) else OSError(value), url, "read")
        out.append((url, bytes(value)))
    return out


def decode(
    raw_files: Sequence[tuple[str, bytes]], typed: frozenset[str] | None = None
) -> tuple[list[Event], list[Problem]]:
    """Events from stored bytes; a file that is not an event is a `Problem`. `typed`: validate
    the data of only these kinds (None: all), the others read as `envelope_from_json`."""
    events: list[Event] = []
    problems: list[Problem] = []
    for url, raw in raw_files:
        try:
            parsed = json.loads(raw)
        except ValueError:  # a partial write, or not an event at all
            problems.append(Problem(url, "not JSON"))
            continue
        try:
            light = typed is not None and not (
                isinstance(parsed, dict) and parsed.get("kind") in typed
            )
            events.append(envelope_from_json(parsed) if light else Event.from_json(parsed))
        except BadEvent as bad:
            problems.append(Problem(url, str(bad)))
    return events, problems


def read_page(store: JobStore, job_id: str, query: EventQuery) -> EventPage:
    """The events `query` admits, oldest first: with a `limit`, the newest that many, reading
    only the newest candidate files (more, further back, when some do not count)."""
    directory = events_dir(store, job_id)
    found = candidates(list_names(store, job_id), query)
    urls = [join(directory, name) for name in found.unnamed]
    events, problems = decode(read_raw(store, urls))
    events = [e for e in events if query.admits(e)]
    if query.limit is None:
        more, more_problems = decode(read_raw(store, [join(directory, n) for n in found.named]))
        events += [e for e in more if query.admits(e)]
        return EventPage(newest(events, None), problems + more_problems, found.count, False)
    named: list[Event] = []
    unread = 0
    for low, high in tail_batches(len(found.named), query.limit):
        batch = [join(directory, name) for name in found.named[low:high]]
        more, more_problems = decode(read_raw(store, batch))
        named += [e for e in more if query.admits(e)]
        problems += more_problems
        if len(named) >= query.limit:  # every file not read yet is older than these
            unread = low
            break
    admitted = events + named
    page = newest(admitted, query.limit)
    return EventPage(page, problems, found.count, unread > 0 or len(page) < len(admitted))


def stream(
    store: JobStore, job_id: str, query: EventQuery, batch: int = STREAM_BATCH
) -> Iterator[tuple[list[Event], list[Problem]]]:
    """Every event `query` admits (its `limit` aside), oldest first, `batch` files at a time.

    Files are taken in name order (time to the microsecond), and each batch is sorted by time:
    the order is the events' time order except among events of the same microsecond. Names
    that say nothing come first, read with the first batch."""
    directory = events_dir(store, job_id)
    found = candidates(list_names(store, job_id), query)
    names = [*found.unnamed, *found.named]
    for start in range(0, len(names), batch):
        urls = [join(directory, name) for name in names[start : start + batch]]
        events, problems = decode(read_raw(store, urls))
        yield newest([e for e in events if query.admits(e)], None), problems


def read_all(store: JobStore, job_id: str, typed: frozenset[str] | None = None) -> EventLog:
    """Every readable event in time order, as `JobStore.read_events` reads them, in one fast
    pass; `typed`: the kinds whose data the caller reads (`decode`)."""
    directory = events_dir(store, job_id)
    urls = [join(directory, name) for name in sorted(list_names(store, job_id))]
    events, problems = decode(read_raw(store, urls), typed)
    return EventLog(newest(events, None), problems)


class EventFollower:
    """A job's events read again and again (`trainctl top`'s refreshes): each `read` lists the
    names and opens only the files it has not read before (an event file is written once and
    never changed), so a refresh costs one listing and the new events, not 100,000 reads."""

    def __init__(self, store: JobStore, job_id: str, typed: frozenset[str] | None = None) -> None:
        self.store, self.job_id, self.typed = store, job_id, typed
        self._events: dict[str, Event] = {}
        self._skipped: set[str] = set()

    def read(self) -> EventLog:
        """Every readable event in time order; the problems of the files read this time."""
        directory = events_dir(self.store, self.job_id)
        new = [
            name
            for name in sorted(list_names(self.store, self.job_id))
            if name not in self._events and name not in self._skipped
        ]
        problems: list[Problem] = []
        for url, raw in read_raw(self.store, [join(directory, name) for name in new]):
            name = url.rsplit("/", 1)[-1]
            events, bad = decode([(url, raw)], self.typed)
            if events:
                self._events[name] = events[0]
            else:
                self._skipped.add(name)
                problems += bad
        return EventLog(newest(list(self._events.values()), None), problems)
