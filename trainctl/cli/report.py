"""`trainctl report JOB`: where a job's time went (the goodput ledger) and a timeline picture.

Reads the job store only (no server needed). The ledger and the GPU utilisation over time (per
node per time bucket, per attempt per node) go to stderr as tables, or with ``--json`` as one
object on stdout; the picture is written to ``--out`` or to the job's local
run directory (``report.html``). The suffix of ``--out`` says what to write: ``.html``/``.htm``
a self-contained page, ``.png`` a PNG, ``.svg`` an SVG; any other is bad input (exit 2, nothing
read or written).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from trainctl.cli.common import (
    JOB_HELP,
    JSON_OPTION,
    STORAGE_OPTION,
    open_job,
    warn_skipped,
)
from trainctl.cli.console import emit_json, plain_table, terminal
from trainctl.errors import UserError
from trainctl.event_reader import read_all
from trainctl.report.draw import gpu_svg, timeline_png, timeline_svg
from trainctl.report.goodput import LEDGER_KINDS, build_ledger
from trainctl.report.gpu import gpu_timeline, read_gpu_series
from trainctl.report.ledger import CATEGORIES, Ledger
from trainctl.report.render import to_html
from trainctl.report.timeline import build_timeline, format_duration, format_share
from trainctl.store_files import current_umask

PICTURE_SUFFIXES = (".html", ".htm", ".png", ".svg")
"""What `--out` can end with (any case)."""

OUT_OPTION = typer.Option(
    None,
    "--out",
    help="Where to write the timeline picture: a .html (or .htm), .png or .svg file. "
    "Default: report.html in the job's local run directory.",
)


def picture_path(out: str) -> Path:
    """`--out` as an absolute path; a `UserError` when its suffix is not one trainctl writes
    or its directory does not exist (checked before any work, so nothing is written)."""
    path = Path(out).expanduser().absolute()
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        accepted = ", ".join(PICTURE_SUFFIXES)
        raise UserError(
            "trainctl cannot write this kind of file",
            where="--out",
            value=out,
            fix=f"end the file name with one of {accepted}",
        )
    _check_directory(path)
    return path


def _check_directory(path: Path) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise UserError(
            "the directory for the picture does not exist",
            where="--out",
            value=str(path),
            fix=f"create {directory} first, or pass --out with an existing directory",
        )


def render_picture(ledger: Ledger, path: Path, gpu: dict[str, Any] | None = None) -> bytes:
    """The picture for `path`'s suffix (one of `PICTURE_SUFFIXES`): PNG, SVG, or an HTML page
    (with the GPU utilisation tables when `gpu` is given)."""
    timeline = build_timeline(ledger)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return timeline_png(timeline)
    if suffix == ".svg":
        return timeline_svg(timeline).encode()
    heat_map = gpu_svg(gpu, ledger.wall_s) if gpu else None
    return to_html(ledger, timeline_svg(timeline), gpu, heat_map).encode()


def write_picture(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole (a temporary file renamed into place)."""
    _check_directory(path)
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".report-")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # not mkstemp's 0600
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise UserError(
            f"cannot write the picture: {error.strerror or error}",
            where="--out",
            value=str(path),
            fix="pass --out with a path you can write",
        ) from None


def report_json(ledger: Ledger, picture: Path, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `report --json` object: the ledger (see `Ledger.to_json`), the picture's path, and
    ``gpu``: GPU utilisation over time (`trainctl.report.gpu.gpu_timeline`: start, bucket_s,
    per node the mean utilisation of each bucket, per attempt per node mean/min/readings)."""
    data = ledger.to_json()
    data["picture"] = str(picture)
    data["gpu"] = gpu
    return data


def _print_gpu(gpu: dict[str, Any], start: float) -> None:
    if not gpu["nodes"]:
        return
    console = terminal.out  # the report is the answer: stdout
    per_attempt = plain_table("ATTEMPT", "NODE", "GPU UTIL MEAN", "MIN", "READINGS")
    for number, nodes in gpu["attempts"].items():
        for node, usage in nodes.items():
            per_attempt.add_row(
                number,
                node,
                f"{usage['mean_util_pct']:.1f}%",
                f"{usage['min_util_pct']}%",
                str(usage["num_readings"]),
            )
    console.print(per_attempt)
    offset = format_duration(gpu["start"] - start)
    console.print(
        f"GPU utilisation per node, mean % per {format_duration(gpu['bucket_s'])} "
        f"from T+{offset} (- : no sample)"
    )
    for node, buckets in gpu["nodes"].items():
        cells = " ".join("-" if value is None else f"{value:.0f}" for value in buckets)
        console.print(escape(f"  {node}: {cells}"))


def _print_ledger(ledger: Ledger, picture: Path) -> None:
    console = terminal.out  # the report is the answer: stdout
    wall = ledger.wall_s
    totals = ledger.seconds
    state = ledger.state + (", still running" if ledger.live else "")
    console.print(
        f"[bold]{escape(ledger.job_id)}[/bold]  {escape(state)}  wall {format_duration(wall)}  "
        f"goodput [bold]{format_share(totals['productive'], wall)}[/bold]"
    )
    categories = plain_table("CATEGORY", "SECONDS", "SHARE")
    for column in categories.columns[1:]:
        column.justify = "right"
    for category in CATEGORIES:
        seconds = totals[category.value]
        categories.add_row(category.value, f"{seconds:.1f}", format_share(seconds, wall))
    categories.add_row("wall", f"{wall:.1f}", format_share(wall, wall))
    console.print(categories)
    attempts = plain_table("ATTEMPT", "NODES", "WORLD", "START", "STEPS", "OUTCOME", "CAUSE")
    for a in ledger.attempts:
        steps = f"{a.restored_step or 0}→{a.last_step}" if a.last_step is not None else "no step"
        attempts.add_row(
            str(a.number),
            ",".join(a.nodes),
            "" if a.world_size is None else str(a.world_size),
            f"T+{format_duration(a.started_at - ledger.start)}",
            steps,
            a.outcome,
            a.cause or "",
        )
    console.print(attempts)
    for failure in ledger.failures:
        where = f" on {failure.node}" if failure.node else ""
        cause = f" ({failure.cause})" if failure.cause else ""
        console.print(
            escape(
                f"{failure.outcome} at T+{format_duration(failure.time - ledger.start)}: "
                f"attempt {failure.attempt}{where}{cause}: {failure.reason or 'no reason given'}"
            )
        )
    console.print(f"timeline: {escape(str(picture))}")


def report(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
    out: str | None = OUT_OPTION,
) -> None:
    """Show where a job's time went (goodput) and write its timeline picture."""
    chosen = picture_path(out) if out else None
    store, job_id = open_job(storage, job_id)
    record = store.read_state(job_id)
    log = read_all(store, job_id, LEDGER_KINDS)  # one pass; 100,000 events in about 2 s
    warn_skipped(log.problems)
    ledger = build_ledger(record, log.events, now=time.time())
    series = read_gpu_series(store, job_id)
    warn_skipped(series.problems)
    gpu = gpu_timeline(series.samples, ledger.start, ledger.end)
    path = chosen or store.local_job_dir(job_id) / "report.html"
    write_picture(path, render_picture(ledger, path, gpu))
    if as_json:
        emit_json(report_json(ledger, path, gpu))
        return
    _print_ledger(ledger, path)
    _print_gpu(gpu, ledger.start)
