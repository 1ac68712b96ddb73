"""Options and helpers shared by the commands."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from trainctl.cli.console import terminal
from trainctl.events import Event
from trainctl.store import JobStore, Problem, resolve_storage_root

STORAGE_OPTION = typer.Option(
    None,
    "--storage",
    help="Storage root (path, file:// or s3://). Default: $TRAINCTL_STORAGE or ~/.trainctl.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def open_store(storage: str | None, create: bool = False) -> JobStore:
    """The job store at `--storage` (or the default), checked usable first (`check_root`):
    its trouble is one message. `create`: a missing local root is fine (launch makes it)."""
    store = JobStore(resolve_storage_root(storage))
    store.check_root(create)
    return store


def read_events(store: JobStore, job_id: str) -> list[Event]:
    """A job's readable events; each unreadable event file is named in a warning."""
    log = store.read_events(job_id)
    warn_skipped(log.problems)
    return log.events


def read_node_verdicts(store: JobStore, job_id: str) -> dict[str, dict[str, Any]]:
    """A job's node verdict documents; each unreadable node file is named in a warning."""
    verdicts, problems = store.read_node_verdicts(job_id)
    warn_skipped(problems)
    return verdicts


def warn_skipped(problems: list[Problem]) -> None:
    for problem in problems:
        terminal.warn(escape(str(problem)))
