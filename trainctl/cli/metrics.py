"""`trainctl metrics JOB [--out FILE]`: the job in Prometheus' text format, from the store alone,
and the `--metrics-port`/`--metrics-host` options of `launch` and `resume`.

`--out FILE` writes the file whole (a temporary name beside it, then a rename), as
node_exporter's textfile collector needs: it never reads a half-written file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import typer

from trainctl.cli.common import JOB_HELP, STORAGE_OPTION, open_job, warn_skipped
from trainctl.cli.console import terminal
from trainctl.errors import UserError
from trainctl.recovery.live_view import MetricsEndpoint, open_metrics
from trainctl.report.live import read_snapshot
from trainctl.report.metrics import exposition

METRICS_PORT_OPTION = typer.Option(
    None,
    "--metrics-port",
    min=0,
    max=65535,
    help="Serve Prometheus /metrics from the controller on this port while it runs "
    "(0: a free port, printed on stderr). Off by default.",
)
METRICS_HOST_OPTION = typer.Option(
    "127.0.0.1", "--metrics-host", help="Address /metrics binds (e.g. 0.0.0.0 for every one)."
)


def start_metrics(host: str, port: int | None) -> MetricsEndpoint | None:
    """Open the ``/metrics`` endpoint `--metrics-port` asks for (None: off) and say where."""
    if port is None:
        return None
    endpoint = open_metrics(host, port)
    # Always shown (even with -q): with port 0 this is the only way to learn the port.
    terminal.console.print(f"metrics: {endpoint.url}", markup=False)
    return endpoint


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    directory = path.parent
    if not directory.is_dir():
        raise UserError(
            "no such directory",
            where="--out",
            value=str(path),
            fix="create the directory first (node_exporter's --collector.textfile.directory)",
        )
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def metrics(
    job_id: str = typer.Argument(..., help=f"The job. {JOB_HELP}"),
    storage: str | None = STORAGE_OPTION,
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Write to FILE atomically (for node_exporter's textfile collector; name it *.prom) "
        "instead of stdout.",
    ),
) -> None:
    """Print the job's metrics in Prometheus' text format, read from the store."""
    store, job_id = open_job(storage, job_id)
    snapshot, problems = read_snapshot(store, job_id, time.time())
    warn_skipped(problems)
    text = exposition(snapshot)
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_atomically(out, text)
        terminal.info(f"wrote {out}")
