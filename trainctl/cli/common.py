"""Options and helpers shared by the commands."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from trainctl.cli.console import terminal
from trainctl.errors import NotFoundError, UserError
from trainctl.events import Event
from trainctl.spec import check_job_id
from trainctl.store import JobStore, Problem, resolve_storage_root

STORAGE_OPTION = typer.Option(
    None,
    "--storage",
    help="Storage root (path, file:// or s3://). Default: $TRAINCTL_STORAGE or ~/.trainctl.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")
JOB_HELP = "Job id, or a unique prefix of one."


def open_store(storage: str | None, create: bool = False) -> JobStore:
    """The job store at `--storage` (or the default), checked usable first (`check_root`):
    its trouble is one message. `create`: a missing local root is fine (launch makes it)."""
    store = JobStore(resolve_storage_root(storage))
    store.check_root(create)
    return store


MAX_LISTED_MATCHES = 10
"""How many of an ambiguous prefix's matches an error names."""


def resolve_job_id(store: JobStore, text: str, allow_unknown: bool = False) -> str:
    """The job id that `text` names in `store`: an exact id wins, else the one id it prefixes.

    One store read when `text` is a whole id; a listing of ``jobs/`` otherwise. Raises
    `UserError` (exit 2) for an invalid id or an ambiguous prefix (naming the matches), and
    `NotFoundError` (exit 2) when nothing matches — unless `allow_unknown`, which returns
    `text` itself (`ckpt` reads checkpoints a script saved with no job in the store).
    """
    check_job_id(text, where="JOB")
    if store.exists(text):
        return text
    jobs = store.list_jobs()
    if text in jobs:  # a job directory without state.json: the command says what is missing
        return text
    matches = sorted(job for job in jobs if job.startswith(text))
    if len(matches) == 1:
        return matches[0]
    if not matches and allow_unknown:
        return text
    if not matches:
        raise NotFoundError(
            "no such job",
            where=store.root,
            value=text,
            fix="run `trainctl list` to see the jobs in this storage root (or pass --storage)",
        )
    shown = ", ".join(matches[:MAX_LISTED_MATCHES])
    more = len(matches) - MAX_LISTED_MATCHES
    raise UserError(
        f"ambiguous job id prefix: {len(matches)} jobs match: {shown}"
        + (f" (and {more} more)" if more > 0 else ""),
        where="JOB",
        value=text,
        fix="type more of the job id (`trainctl list` shows them whole)",
    )


def open_job(storage: str | None, text: str) -> tuple[JobStore, str]:
    """The store of `--storage` and the job id `text` resolves to there (`resolve_job_id`)."""
    store = open_store(storage)
    return store, resolve_job_id(store, text)


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
