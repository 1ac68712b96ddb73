"""`trainctl top JOB`: a live view of a running job, from the store alone (no server).

Every `--interval` (at most 1 s) it reads the job's snapshot (`trainctl.report.live`) and
redraws: the job's line (state, attempt, step, goodput so far, newest checkpoint), counts of
nodes per state and health, a row per node (state, health, step, step time p50/p99, steps/s,
GPU utilisation and memory, heartbeat age, flags), and the latest events. Silent nodes and
stragglers are coloured and carry a word in FLAGS (so NO_COLOR shows them too). With more
nodes than `--nodes`, only the worst ones are listed (silent, unhealthy, stragglers, slowest).

It quits on q or Ctrl-C, and by itself once the job has ended (after drawing the final frame).
`--once` prints one frame to stdout and exits (for scripts).
"""

from __future__ import annotations

import contextlib
import select
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trainctl.cli.common import JOB_HELP, STORAGE_OPTION, open_job, warn_skipped
from trainctl.cli.console import format_age, plain_table, terminal
from trainctl.event_reader import EventFollower
from trainctl.report.live import (
    SNAPSHOT_KINDS,
    JobSnapshot,
    NodeView,
    count_by,
    read_snapshot,
    worst_nodes,
)
from trainctl.store import JobStore

GIB = 1024**3
DEFAULT_NODES = 32
"""Nodes listed before `top` shows only the worst ones."""
ROW_STYLES = (("silent", "bold red"), ("straggler", "yellow"), ("excluded", "dim"))


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _gpu(node: NodeView) -> tuple[str, str]:
    util = "-" if node.gpu_util_pct is None else f"{node.gpu_util_pct:.0f}%"
    used, total = node.gpu_memory_used_bytes, node.gpu_memory_total_bytes
    memory = "-" if used is None or not total else f"{used / GIB:.0f}/{total / GIB:.0f}G"
    return util, memory


def _style(node: NodeView) -> str:
    if node.health == "UNHEALTHY" and not node.silent:
        return "red"
    return next((style for flag, style in ROW_STYLES if getattr(node, flag)), "")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def header(snap: JobSnapshot) -> Text:
    """The job's lines: state, attempt, step; goodput so far and the newest checkpoint."""
    parts = [f"job {snap.job_id} ({snap.name})", snap.state]
    if snap.attempt is not None:
        parts.append(f"attempt {snap.attempt}")
    parts.append(f"step {snap.step if snap.step is not None else '-'}")
    text = Text("  ".join(parts), style="bold")
    committed, age = snap.checkpoints.committed_step, snap.checkpoint_age_s
    checkpoint = "no checkpoint yet"
    if committed is not None:
        checkpoint = f"checkpoint step {committed}"
        checkpoint += f", {format_age(age)} ago" if age is not None else ""
    text.append(f"\ngoodput {_percent(snap.goodput)} of {format_age(snap.wall_s)}; {checkpoint}")
    if not snap.live and snap.reason:
        text.append(f"\n{snap.reason}")
    return text


def summary(snap: JobSnapshot) -> Text:
    """Counts of nodes per state and health, how many are flagged, where the time went."""
    nodes = snap.nodes
    states = ", ".join(f"{n} {s}" for s, n in count_by(nodes, "state").items())
    health = ", ".join(f"{n} {h}" for h, n in count_by(nodes, "health").items())
    line = Text(f"{len(nodes)} nodes: {states or 'none'}")
    silent = sum(node.silent for node in nodes)
    stragglers = sum(node.straggler for node in nodes)
    if silent:
        line.append(f"; {silent} silent", style="bold red")
    if stragglers:
        line.append(f"; {stragglers} straggler(s)", style="yellow")
    line.append(f"\nhealth: {health or '-'}")
    spent = [f"{name} {format_age(s)}" for name, s in snap.ledger_seconds.items() if s >= 1]
    if spent:
        line.append("\ntime: " + ", ".join(spent))
    return line


def node_table(snap: JobSnapshot, most: int) -> tuple[Table, str]:
    """The node rows (all of them, or the worst `most`) and a note when some are left out."""
    nodes = list(snap.nodes)
    note = ""
    if len(nodes) > most:
        nodes = worst_nodes(nodes, most)
        note = f"worst {most} of {len(snap.nodes)} nodes shown (--nodes to change)"
    table = plain_table(
        "NODE", "STATE", "HEALTH", "STEP", "P50", "P99", "STEP/S", "GPU", "MEM", "BEAT", "FLAGS"
    )
    for column in table.columns[3:10]:
        column.justify = "right"
    for node in nodes:
        util, memory = _gpu(node)
        rate = "-" if node.steps_per_s is None else f"{node.steps_per_s:.1f}"
        beat = "-" if node.heartbeat_age_s is None else format_age(node.heartbeat_age_s)
        table.add_row(
            node.name,
            node.state,
            node.health,
            "-" if node.step is None else str(node.step),
            _seconds(node.step_p50_s),
            _seconds(node.step_p99_s),
            rate,
            util,
            memory,
            beat,
            " ".join(node.markers()),
            style=_style(node),
        )
    return table, note


def event_lines(snap: JobSnapshot) -> Text:
    text = Text("latest events", style="bold")
    for event in snap.events:
        when = datetime.fromtimestamp(event.time, tz=timezone.utc).strftime("%H:%M:%S")
        text.append(f"\n{when} {event.kind}: {event.message}")
    return text


def render_frame(snap: JobSnapshot, most: int = DEFAULT_NODES) -> RenderableType:
    """One frame of `top` for `snap`."""
    table, note = node_table(snap, most)
    parts: list[RenderableType] = [header(snap), summary(snap), Text(""), table]
    if note:
        parts.append(Text(note, style="dim"))
    parts += [Text(""), event_lines(snap)]
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Single key presses readable from stdin while inside (True when stdin is a terminal)."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(sys.stdin)
    try:
        tty.setcbreak(sys.stdin.fileno())
        yield True
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def _wait_for_quit(seconds: float, keys: bool) -> bool:
    """Sleep `seconds`; True if q was pressed meanwhile."""
    if not keys:
        time.sleep(seconds)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    return bool(ready) and sys.stdin.read(1).lower() == "q"


def _frame(
    store: JobStore, job_id: str, now: float | None, most: int, follower: EventFollower
) -> tuple[JobSnapshot, RenderableType]:
    snap, problems = read_snapshot(store, job_id, time.time() if now is None else now, follower)
    warn_skipped(problems)
    return snap, render_frame(snap, most)


def top(
    job_id: str = typer.Argument(..., help=f"The job. {JOB_HELP}"),
    storage: str | None = STORAGE_OPTION,
    once: bool = typer.Option(False, "--once", help="Print one frame to stdout and exit."),
    interval: float = typer.Option(
        1.0, "--interval", min=0.1, max=1.0, help="Seconds between refreshes."
    ),
    nodes: int = typer.Option(
        DEFAULT_NODES, "--nodes", min=1, help="List at most this many nodes (the worst first)."
    ),
    at: float | None = typer.Option(None, "--at", hidden=True, help="Testing: the clock (epoch)."),
) -> None:
    """Watch a job live: nodes, step times, GPUs, heartbeats, events, goodput (q quits)."""
    store, job_id = open_job(storage, job_id)
    follower = EventFollower(store, job_id, SNAPSHOT_KINDS)  # each refresh reads new events only
    if once:
        terminal.out.print(_frame(store, job_id, at, nodes, follower)[1])
        return
    with (
        contextlib.suppress(KeyboardInterrupt),
        _keys() as keys,
        Live(console=terminal.out, auto_refresh=False) as live,
    ):
        while True:
            snap, frame = _frame(store, job_id, at, nodes, follower)
            live.update(frame, refresh=True)
            if not snap.live or _wait_for_quit(interval, keys):
                return
