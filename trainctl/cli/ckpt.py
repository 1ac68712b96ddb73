"""`trainctl ckpt ls|verify|gc JOB`: a job's checkpoints, read straight from storage.

The checkpoint root is the recipe's ``checkpoint.storage`` (read from the job's stored
``spec.yaml``) or ``<storage root>/checkpoints/<job id>``; `--storage`, ``$TRAINCTL_STORAGE``
or ``~/.trainctl`` picks the storage root. No server is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from trainctl.checkpoint import inspect
from trainctl.checkpoint.retention import MIN_KEEP_LAST
from trainctl.cli.common import JOB_HELP, JSON_OPTION, STORAGE_OPTION, open_store, resolve_job_id
from trainctl.cli.console import QUIET, emit_json, emit_result, emit_table, terminal
from trainctl.cli.progress import Meter
from trainctl.cli.times import wall_and_age
from trainctl.errors import NotFoundError, UserError
from trainctl.recipe import stored_checkpoint_section
from trainctl.secrets import without_redacted
from trainctl.spec import CheckpointSpec

app = typer.Typer(
    help="Inspect, verify and garbage-collect a job's checkpoints.", no_args_is_help=True
)

JOB_ARGUMENT = typer.Argument(..., help=JOB_HELP)


@dataclass(frozen=True)
class JobCheckpoints:
    """Where a job's checkpoints are and the retention its recipe asked for."""

    job_id: str
    """The job id the command's JOB resolved to (a unique prefix names the whole id)."""
    known: bool
    """Whether the job store has this job (checkpoints a script saved have none; a job's
    checkpoints may also outlive its record)."""
    root: str
    storage_options: dict[str, Any]
    keep_last: int
    keep_every: int | None


def job_checkpoints(storage: str | None, job_id: str) -> JobCheckpoints:
    """A job's checkpoint root and settings, from its stored spec's validated ``checkpoint:``
    section (the defaults when the job has no stored spec). Credentials are not stored: the
    standard AWS chain supplies them."""
    store = open_store(storage)
    job_id = resolve_job_id(store, job_id, allow_unknown=True)
    text = store.read_spec_text(job_id)
    known = text is not None or store.exists(job_id)
    section = CheckpointSpec()
    if text is not None:
        section = stored_checkpoint_section(text, f"{store.job_url(job_id)}/spec.yaml")
    return JobCheckpoints(
        job_id=job_id,
        known=known,
        root=store.checkpoint_root(job_id, section.storage),
        storage_options=without_redacted(section.storage_options),
        keep_last=section.keep_last,
        keep_every=section.keep_every or None,
    )


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _created(created_at: str | None, now: float) -> str:
    if not created_at:
        return ""
    try:
        return wall_and_age(datetime.fromisoformat(created_at).timestamp(), now)
    except ValueError:
        return "?"


@app.command("ls")
def list_checkpoints(
    job_id: str = JOB_ARGUMENT,
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List a job's checkpoint steps: committed or not, size, world size, age."""
    where = job_checkpoints(storage, job_id)
    job_id = where.job_id
    steps = inspect.list_steps(where.root, storage_options=where.storage_options)
    if not steps and not where.known:
        raise NotFoundError(
            "no such job, and no checkpoints of it",
            where=where.root,
            value=job_id,
            fix="run `trainctl list` to see the jobs in this storage root (or pass --storage)",
        )
    if as_json:
        emit_json({"job_id": job_id, "root": where.root, "steps": [s.to_json() for s in steps]})
        return
    if not steps:
        terminal.info(f"no checkpoints under {where.root}")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("STEP", "COMMITTED", "SIZE", "WORLD", "CREATED", "NOTE"):
        table.add_column(column, justify="right" if column in ("STEP", "SIZE", "WORLD") else "left")
    now = time.time()
    for info in steps:
        table.add_row(
            str(info.step),
            "yes" if info.committed else "no",
            _size(info.size_bytes),
            "" if info.world_size is None else str(info.world_size),
            _created(info.created_at, now),
            info.problem or ("" if info.committed else "no manifest"),
        )
    emit_table(table)


@app.command("verify")
def verify_checkpoint(
    job_id: str = JOB_ARGUMENT,
    step: int | None = typer.Option(
        None, "--step", help="Step to verify (default: newest committed)."
    ),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Read every object of a committed step and check sizes and checksums (exit 1 if bad)."""
    where = job_checkpoints(storage, job_id)
    job_id = where.job_id
    if step is None:
        committed = [
            s.step
            for s in inspect.list_steps(where.root, storage_options=where.storage_options)
            if s.committed
        ]
        if not committed:
            raise NotFoundError(
                "no committed checkpoint to verify",
                where=where.root,
                fix="`trainctl ckpt ls JOB` lists the steps; a step counts once committed",
            )
        step = committed[-1]
    progress = Progress(
        TextColumn(f"verify step {step}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=terminal.console,
        disable=terminal.verbosity <= QUIET,
        transient=True,
    )
    task = progress.add_task("verify", total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    try:
        with progress:
            result = inspect.verify(
                where.root, step, progress_callback=advance, storage_options=where.storage_options
            )
    except FileNotFoundError:
        raise NotFoundError(
            f"step {step} has no manifest (not committed)",
            where=where.root,
            fix="`trainctl ckpt ls JOB` lists the committed steps",
        ) from None
    if as_json:
        emit_json(
            {
                "job_id": job_id,
                "step": step,
                "ok": result.ok,
                "bytes_verified": result.bytes_verified,
                "problems": [{"path": p.path, "problem": p.problem} for p in result.problems],
            }
        )
    elif result.ok:
        terminal.info(f"step {step}: ok ({_size(result.bytes_verified)} verified)")
        emit_result(str(step))
    for problem in result.problems:
        terminal.error(f"step {step}: {problem.path}: {problem.problem}")
    if not result.ok:
        raise typer.Exit(1)


@app.command("gc")
def collect_garbage(
    job_id: str = JOB_ARGUMENT,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be deleted; delete nothing."
    ),
    keep_last: int | None = typer.Option(
        None, "--keep-last", help="Committed steps to keep (default: the recipe's, else 2)."
    ),
    keep_every: int | None = typer.Option(
        None, "--keep-every", help="Also keep multiples of this step (default: the recipe's)."
    ),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete steps the retention policy rejects, uncommitted leftovers and orphaned uploads."""
    where = job_checkpoints(storage, job_id)
    job_id = where.job_id
    keep_last = where.keep_last if keep_last is None else keep_last
    keep_every = where.keep_every if keep_every is None else (keep_every or None)
    if keep_last < MIN_KEEP_LAST:
        raise UserError(
            f"keep_last must be at least {MIN_KEEP_LAST}",
            where="--keep-last",
            value=keep_last,
            fix="the newest checkpoint may be unreadable after a crash: keep one more",
        )
    with Meter("deleting checkpoint steps", None, unit="steps") as meter:
        actions = inspect.gc(
            where.root,
            keep_last,
            keep_every,
            dry_run,
            storage_options=where.storage_options,
            on_deleted=None if dry_run else meter.update,
        )
    if as_json:
        emit_json(
            {
                "job_id": job_id,
                "dry_run": dry_run,
                "deleted": [
                    {"path": a.path, "step": a.step, "kind": a.kind, "reason": a.reason}
                    for a in actions
                ],
            }
        )
        return
    verb = "would delete" if dry_run else "deleted"
    if not actions:
        terminal.info(f"nothing to delete under {where.root}")
    for action in actions:  # the command's answer: stdout, -q or not
        emit_result(f"{verb} {action.path}: {action.reason}")
