"""`trainctl events JOB`: a job's events, the newest page by default, or all of them streamed.

A week-old job on a thousand nodes holds 100,000 events, one object each. By default the
command shows the newest `DEFAULT_LIMIT` (`--limit N` for another count) and opens only those
files: the names are time-ordered and carry the kind, so `--since`, `--until` and `--kind`
are applied to the listing before anything is read (`trainctl.event_pages`). `--all` streams
every admitted event in time order, a batch of files at a time, never holding them all.

Output: a table on stdout (aligned lines past `TABLE_EVENTS` rows, or with `--all`), or with
``--json`` one JSON array of event objects, the same shape with or without `--all` (streamed
then, element by element). When the page leaves older events out, stderr says how many.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence

import typer

from trainctl.cli.common import JOB_HELP, JSON_OPTION, STORAGE_OPTION, open_job, warn_skipped
from trainctl.cli.console import emit_json, emit_table, plain_table, terminal
from trainctl.cli.jobs import parse_since
from trainctl.cli.times import iso_timestamps
from trainctl.errors import UserError
from trainctl.event_pages import EventQuery
from trainctl.event_reader import read_page, stream
from trainctl.events import Event
from trainctl.store import Problem

DEFAULT_LIMIT = 200
"""How many of the newest events `trainctl events` shows without `--limit` or `--all`."""
TABLE_EVENTS = 2000
"""Up to this many events print as a table; more (and `--all`) print as aligned lines."""
HEADERS = ("T+", "KIND", "NODE", "MESSAGE")


def build_query(
    limit: int | None,
    show_all: bool,
    since: str | None,
    until: str | None,
    kinds: Sequence[str],
    now: float,
) -> EventQuery:
    """The options as a query; a `UserError` for a contradiction (exit 2, nothing read)."""
    if show_all and limit is not None:
        raise UserError(
            "--all and --limit contradict each other",
            where="--limit",
            value=str(limit),
            fix="give --all for every event, or --limit N for the newest N",
        )
    low = parse_since(since, now, where="--since") if since is not None else None
    high = parse_since(until, now, where="--until") if until is not None else None
    if low is not None and high is not None and low > high:
        raise UserError(
            "--since is later than --until: no event can match",
            where="--until",
            value=str(until),
            fix="give an --until after --since (ages count back from now: --since 2h --until 1h)",
        )
    return EventQuery(
        since=low,
        until=high,
        kinds=frozenset(k.strip() for k in kinds) if kinds else None,
        limit=None if show_all else (limit or DEFAULT_LIMIT),
    )


def event_row(event: Event, start: float) -> tuple[str, str, str, str]:
    return (f"{event.time - start:7.2f}s", event.kind, event.node or "", event.message)


def aligned_event_lines(
    rows: Iterator[tuple[str, str, str, str]], widths: Sequence[int]
) -> Iterator[str]:
    """Rows as lines, each column padded to `widths` (a wider cell pushes the rest along)."""
    for cells in rows:
        yield (
            "  ".join(
                c.rjust(w) if i == 0 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells[:-1], widths, strict=True))
            )
            + "  "
            + cells[-1]
        )


def _write_lines(lines: Iterator[str]) -> None:
    out = terminal.out.file  # the listing is the command's answer: stdout
    for line in lines:
        out.write(line.rstrip() + "\n")
    out.flush()


def _print_page(events: Sequence[Event], start: float) -> None:
    rows = [event_row(e, start) for e in events]
    if len(rows) <= TABLE_EVENTS:
        table = plain_table(*HEADERS)
        for row in rows:
            table.add_row(*row)
        emit_table(table)
        return
    # A long page as aligned lines: a table measures every row before printing the first.
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS[:-1])]
    _write_lines(aligned_event_lines(iter([HEADERS, *rows]), widths))


def _stream_all(
    batches: Iterator[tuple[list[Event], list[Problem]]], start: float, as_json: bool
) -> int:
    """Write every event of `batches` as it comes; returns how many."""
    out = terminal.out.file
    count = 0
    if as_json:
        out.write("[")
    widths: list[int] | None = None
    for events, problems in batches:
        warn_skipped(problems)
        if as_json:
            for event in events:
                out.write(("," if count else "") + "\n")
                out.write(json.dumps(iso_timestamps(event.to_json()), sort_keys=True, default=str))
                count += 1
            continue
        rows = [event_row(e, start) for e in events]
        if widths is None:  # the first batch sets the columns
            widths = [
                max(len(h), *(len(r[i]) for r in rows), 0) for i, h in enumerate(HEADERS[:-1])
            ]
            rows.insert(0, HEADERS)
        _write_lines(aligned_event_lines(iter(rows), widths))
        count += len(events)
    if as_json:
        out.write("\n]\n" if count else "]\n")
    out.flush()
    return count


def events(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
    limit: int | None = typer.Option(
        None, "--limit", "-n", min=1, help=f"Show the newest N events (default {DEFAULT_LIMIT})."
    ),
    show_all: bool = typer.Option(
        False, "--all", help="Every event, streamed in time order (however many there are)."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Only events since: an age (30m, 2h, 3d) or an ISO date or time."
    ),
    until: str | None = typer.Option(
        None, "--until", help="Only events until: an age (30m, 2h) or an ISO date or time."
    ),
    kinds: list[str] = typer.Option(
        [], "--kind", help="Only events of this kind (repeat for several), e.g. node_exited."
    ),
) -> None:
    """Show a job's events in time order: the newest page, or --all of them."""
    query = build_query(limit, show_all, since, until, kinds, time.time())
    store, job_id = open_job(storage, job_id)
    start = store.read_state(job_id).created_at
    if query.limit is None:
        if not _stream_all(stream(store, job_id, query), start, as_json) and not as_json:
            terminal.info("no events match")
        return
    page = read_page(store, job_id, query)
    warn_skipped(page.problems)
    if as_json:
        emit_json([e.to_json() for e in page.events])
    else:
        _print_page(page.events, start)
    if page.truncated:
        terminal.info(
            f"the newest {len(page.events):,} of {page.num_candidates:,} events: "
            "--limit N for more, --all for every one, --since/--until/--kind to filter"
        )
