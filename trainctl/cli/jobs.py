"""`trainctl list | status JOB | events JOB`: read the job store only; no server needed.

JOB is a job id or a unique prefix of one (`trainctl.cli.common.resolve_job_id`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import time
from datetime import datetime
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from trainctl import schedulers
from trainctl.cli.common import (
    JOB_HELP,
    JSON_OPTION,
    STORAGE_OPTION,
    open_job,
    open_store,
    read_node_verdicts,
    warn_skipped,
)
from trainctl.cli.console import (
    emit_json,
    emit_rows,
    emit_table,
    format_age,
    names_cell,
    plain_table,
    terminal,
)
from trainctl.cli.times import wall_and_age
from trainctl.errors import UserError
from trainctl.health.utilisation import IdleFinding, NodeUtilisation
from trainctl.lease import controller_seen
from trainctl.report.gpu import node_usage_json, read_gpu_series, stored_health
from trainctl.report.progress import ProgressView
from trainctl.state import JobRecord, JobState
from trainctl.store import JobStore

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class GpuStatus:
    """What `status` shows of the job's GPUs: each node's use over the recent window (the
    spec's ``health.gpu_idle_window_s`` up to the newest sample) and the nodes flagged idle."""

    window_s: float
    nodes: dict[str, NodeUtilisation]
    idle: dict[str, IdleFinding]


def gpu_status(store: JobStore, job_id: str) -> GpuStatus:
    health = stored_health(store, job_id)
    series = read_gpu_series(store, job_id, last_s=health.gpu_idle_window_s)
    warn_skipped(series.problems)
    idle = {node: f for node, f in series.idle(health).items() if f.idle}
    return GpuStatus(health.gpu_idle_window_s, series.summaries(health.gpu_idle_window_s), idle)


def _gpu_text(usage: NodeUtilisation | None) -> str:
    """``91% (min 88%), 58.6/79.6 GiB`` for the node table."""
    if usage is None:
        return ""
    if usage.mean_util_pct is None:
        return "n/a" if usage.num_gpus else "no GPUs"
    text = f"{usage.mean_util_pct:.0f}% (min {usage.min_util_pct:.0f}%)"
    if usage.memory_used_bytes is not None and usage.memory_total_bytes:
        text += f", {usage.memory_used_bytes / GIB:.1f}/{usage.memory_total_bytes / GIB:.1f} GiB"
    return text


LIVE = (JobState.RUNNING, JobState.RECOVERING)
"""States in which a controller should be renewing the job's lease."""


def controller_alive(store: JobStore, record: JobRecord) -> bool:
    """False when a job in a `LIVE` state has no controller renewing its lease."""
    if record.state not in LIVE:
        return True
    try:
        return controller_seen(store, record.job_id).alive
    except Exception:  # an unreadable lease is no reason to fail a listing
        return True


def status_json(
    record: JobRecord,
    verdicts: dict[str, dict[str, Any]] | None = None,
    blocklist: dict[str, dict[str, Any]] | None = None,
    gpus: GpuStatus | None = None,
) -> dict[str, object]:
    """The `status --json` object: a stable, documented shape.

    Each node carries ``health``: its last verdict from ``nodes/<node>.json`` (status, reason,
    phase, checked_at; the evidence is in `trainctl health JOB --json`), or null; and ``gpu``:
    its GPU use over the recent window (num_samples, since, until, num_gpus, mean_util_pct,
    min_util_pct, memory_used_bytes, memory_total_bytes, and ``idle``: the idle-GPU finding
    when the node is flagged, else null), or null when it sent no samples. ``gpu_window_s`` is
    the window. ``excluded`` is the job's blocklist: node -> reason, cause, since, expires_at,
    active.
    """
    data = record.to_json()
    now = time.time()
    data["excluded"] = {
        node: {**entry, "active": float(entry.get("expires_at", 0)) > now}
        for node, entry in (blocklist or {}).items()
    }
    data["attempts_count"] = len(record.attempts)
    verdicts = verdicts or {}
    gpus = gpus or GpuStatus(0.0, {}, {})
    data["gpu_window_s"] = gpus.window_s
    for node in data["nodes"]:
        node["gpu"] = node_usage_json(gpus.nodes.get(node["name"]), gpus.idle.get(node["name"]))
        verdict = verdicts.get(node["name"])
        node["health"] = (
            None
            if verdict is None
            else {key: verdict.get(key) for key in ("status", "reason", "phase", "checked_at")}
        )
    return data


SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float, where: str = "--since") -> float:
    """`--since` (or `where`: `--until`): an age (``90s``, ``30m``, ``2h``, ``3d``, ``1w``)
    or an ISO 8601 date or time (``2026-12-01``, ``2026-12-01T08:00``; local time unless it
    carries a zone), as a Unix time. Raises `UserError` otherwise."""
    age = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if age:
        return now - float(age.group(1)) * SINCE_UNITS[age.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UserError(
            "not an age or a date",
            where=where,
            value=text,
            fix="give an age such as 30m, 2h, 3d or 1w, or an ISO date such as 2026-12-01 "
            "or 2026-12-01T08:00",
        ) from None


def parse_state(text: str) -> JobState:
    """`--state`: a job state's name (any case). Raises `UserError` otherwise."""
    try:
        return JobState(text.strip().lower())
    except ValueError:
        raise UserError(
            "not a job state",
            where="--state",
            value=text,
            fix="use one of " + ", ".join(state.value for state in JobState),
        ) from None


def name_matches(pattern: str, name: str) -> bool:
    """`--name`: a glob (``tiny-*``) when it holds ``*?[``, else a substring; both ignore case."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatch(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()


LIST_COLUMNS = ("JOB", "NAME", "STATE", "ATTEMPTS", "STEP", "AGE")
DROPPED_FIRST = ("ATTEMPTS", "STEP", "NAME")
"""The columns a narrow terminal loses, in order; JOB, STATE and AGE always stay."""
NAME_MIN_WIDTH = 8


def jobs_table(
    records: list[JobRecord], now: float, width: int, silent: set[str] | None = None
) -> Table:
    """The `list` table for a terminal `width` wide. The job id is the one thing to copy: it is
    never wrapped or cut; NAME wraps, and when even that does not fit, whole columns go
    (`DROPPED_FIRST`) rather than a column being cut to an ellipsis."""
    rows = [
        {
            "JOB": r.job_id,
            "NAME": r.name,
            # `running?`: no controller renews the job's lease (it died, or its host did)
            "STATE": r.state.value + ("?" if r.job_id in (silent or set()) else ""),
            "ATTEMPTS": str(len(r.attempts)),
            "STEP": "" if r.step is None else str(r.step),
            "AGE": format_age(now - r.created_at),
        }
        for r in records
    ]
    needed = {
        column: max(len(column), *(len(row[column]) for row in rows)) for column in LIST_COLUMNS
    }
    needed["NAME"] = min(needed["NAME"], NAME_MIN_WIDTH)
    columns = list(LIST_COLUMNS)
    for column in DROPPED_FIRST:
        if sum(needed[c] for c in columns) + 2 * (len(columns) - 1) <= width:
            break
        columns.remove(column)
    table = plain_table(*columns)
    for shown in table.columns:
        if shown.header != "NAME":
            shown.no_wrap = True
            shown.min_width = needed[str(shown.header)]
    for row in rows:
        table.add_row(*(row[column] for column in columns))
    return table


def list_jobs(
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
    state_names: list[str] = typer.Option(
        [], "--state", help="Only jobs in this state (repeat for several)."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Only jobs created since: an age (2h, 3d) or an ISO date."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Only jobs whose name holds this text, or matches this glob."
    ),
) -> None:
    """List the jobs in the storage root, newest first (a table on stdout)."""
    now = time.time()
    states = [parse_state(text) for text in state_names]
    created_after = parse_since(since, now) if since is not None else None
    store = open_store(storage)
    records = []
    for job_id in store.list_jobs():
        try:
            records.append(store.read_state(job_id))
        except Exception as exc:  # one unreadable job must not hide the others
            terminal.warn(escape(f"{job_id}: cannot read state ({exc})"))
    total = len(records)
    records = [
        r
        for r in records
        if (not states or r.state in states)
        and (created_after is None or r.created_at >= created_after)
        and (name is None or name_matches(name, r.name))
    ]
    records.sort(key=lambda r: (r.created_at, r.job_id), reverse=True)
    silent = {r.job_id for r in records if not controller_alive(store, r)}
    if as_json:
        emit_json(
            [
                {
                    "job_id": r.job_id,
                    "name": r.name,
                    "state": r.state.value,
                    "controller_alive": r.job_id not in silent if r.state in LIVE else None,
                    "created_at": r.created_at,
                    "attempts": len(r.attempts),
                    "step": r.step,
                }
                for r in records
            ]
        )
        return
    if not records:
        terminal.info(
            f"no jobs under {store.root}"
            if not total
            else f"none of the {total} jobs under {store.root} match the filters"
        )
        return
    emit_table(jobs_table(records, now, terminal.out.width, silent))


def with_live_steps(store: JobStore, job_id: str, record: JobRecord) -> None:
    """Give each node of a running job its step from the live progress view: the stored
    record keeps a node's step only as of its last state move (a node's progress alone does
    not rewrite its record, `trainctl.state_pieces`)."""
    rows, _ = store.read_progress_rows(job_id)  # `top` and `metrics` report unreadable ones
    progress, _ = ProgressView.from_rows(rows)
    for node in record.nodes:
        seen = progress.nodes.get(node.name)
        if seen is not None:
            node.step = max(node.step or 0, seen.step)


def status(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a job's state, nodes and attempts."""
    store, job_id = open_job(storage, job_id)
    record = store.read_state(job_id)
    if record.state in LIVE:
        with_live_steps(store, job_id, record)
    verdicts = read_node_verdicts(store, job_id)
    blocklist = store.read_blocklist(job_id)
    slurm = schedulers.describe(record)
    gpus = gpu_status(store, job_id)
    seen = controller_seen(store, job_id) if record.state in LIVE else None
    if as_json:
        data = status_json(record, verdicts, blocklist, gpus)
        data["slurm" if record.scheduler != "ray" else "ray"] = slurm
        data["controller"] = (
            None
            if seen is None
            else {
                "alive": seen.alive,
                "last_heard_s": seen.last_heard_s,
                "holder": seen.holder.describe() if seen.holder else None,
            }
        )
        emit_json(data)
        return
    console = terminal.out  # the status is the command's answer: stdout
    now = time.time()
    doubt = "?" if seen is not None and not seen.alive else ""
    console.print(
        f"[bold]{escape(record.job_id)}[/bold]  {escape(record.name)}  "
        f"[bold]{record.state.value}{doubt}[/bold]"
        + (f"  ({escape(record.reason)})" if record.reason else "")
    )
    if seen is not None and not seen.alive:
        console.print(
            escape(
                f"{seen.describe()}: it may be gone; `trainctl resume {job_id}` takes the job "
                "over once its lease has expired"
            )
        )
    console.print(
        f"created {wall_and_age(record.created_at, now)}, "
        f"updated {wall_and_age(record.updated_at, now)}"
    )
    if slurm is not None and record.scheduler == "ray":
        console.print(escape(f"ray: {slurm['describe']}"))
    elif slurm is not None:
        console.print(escape(f"slurm job {record.scheduler_job_id}: {slurm['describe']}"))
    if record.step is not None:
        console.print(f"step {record.step}")
    if record.fingerprint:
        console.print(f"final step {record.final_step}, fingerprint {record.fingerprint}")
    rows = [
        (
            node.name,
            node.state.value,
            "" if node.pid is None else str(node.pid),
            "" if node.step is None else str(node.step),
            str(verdicts.get(node.name, {}).get("status", "")),
            _gpu_text(gpus.nodes.get(node.name)),
            node.reason,
        )
        for node in record.nodes
    ]
    emit_rows(("NODE", "STATE", "PID", "STEP", "HEALTH", "GPU UTIL, MEMORY", "REASON"), rows)
    if gpus.nodes:
        console.print(f"GPU use over the last {format_age(gpus.window_s)} of samples")
    for finding in gpus.idle.values():
        console.print(escape(f"GPUs idle: {finding.reason}"), style="yellow")
    for node in record.nodes:
        verdict = verdicts.get(node.name, {})
        if verdict.get("status") not in (None, "OK"):
            console.print(
                escape(f"{node.name} health: {verdict.get('status')}: {verdict.get('reason')}")
            )
    for name, entry in sorted(blocklist.items()):
        expires = float(entry.get("expires_at", 0))
        until = (
            f"for another {format_age(expires - now)}" if expires > now else "expired: may return"
        )
        console.print(escape(f"excluded {name} ({until}): {entry.get('reason', '')}"))
    attempts = plain_table("ATTEMPT", "STATE", "NODES", "WORLD", "DURATION", "CAUSE", "REASON")
    for a in record.attempts:
        end = a.ended_at if a.ended_at is not None else now
        attempts.add_row(
            str(a.number),
            a.state.value,
            names_cell(a.nodes),
            str(a.world_size),
            f"{end - a.started_at:.1f}s",
            a.cause or "",
            a.reason,
        )
    console.print(attempts)
    if record.restarts:
        spent = ", ".join(f"{cause} {count}" for cause, count in sorted(record.restarts.items()))
        console.print(f"restarts: {spent}")
