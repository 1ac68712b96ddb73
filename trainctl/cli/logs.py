"""`trainctl logs JOB`: the node logs the job store holds, filtered, and followed with `-f`.

Where the logs are: each node agent appends its torchrun's output (workers' stdout and stderr,
lines prefixed ``[default<local rank>]:`` by torchrun's ``--tee``; a worker's uncaught exception
also ``[rank<global rank>]:``) to ``jobs/<id>/logs/<node>.log``, writing a line
``--- attempt N on <node>`` before each attempt's torchrun. With a local (file://) root that file
*is* in the store, so `-f` sees lines as they are written. With an s3:// root the logs live on
the controller's host and are copied up when the controller ends (`JobStore.upload_logs`): until
then there is nothing to read, and `-f` shows them once the job has ended.

Ranks: `--rank R` is a global rank. A ``[rankR]:`` line names it exactly. A ``[defaultL]:`` line
names only a local rank: its global rank comes from the attempt's saved stack dumps (they record
rank and local rank per node) when there are any, else from the attempt's node order times the
workers per node (world size / nodes) — torchrun's rendezvous may order nodes differently, so
that mapping is announced on stderr as an assumption.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import IO

import typer
from rich.markup import escape

from trainctl.cli.common import JOB_HELP, STORAGE_OPTION, open_job, warn_skipped
from trainctl.cli.console import terminal
from trainctl.errors import UserError
from trainctl.event_pages import EventQuery
from trainctl.event_reader import read_page
from trainctl.events import StacksSaved
from trainctl.store import JobStore, join

MARKER = re.compile(r"^--- attempt (\d+) on (\S+)$")
"""The line the node agent writes before each attempt's torchrun (`launch/agent.py`)."""
LOCAL_PREFIX = re.compile(r"^\[[A-Za-z_]\w*?(\d+)\]:")
"""torchrun's ``--tee`` prefix: role name and local rank (``[default0]:``)."""
GLOBAL_PREFIX = re.compile(r"^(?:\[[A-Za-z_]\w*?\d+\]:)?\s*\[rank(\d+)\]:")
"""A worker's own ``[rank<N>]:`` prefix (torch.distributed's exception hook), after torchrun's."""
REMOTE_SETTLE_S = 10.0
"""How long `-f` keeps reading a remote root after the job ended: the controller copies the
logs up after its last state write."""


@dataclasses.dataclass(frozen=True)
class LogLine:
    """One line of a node's log and the attempt section it is in (None: before any attempt)."""

    node: str
    attempt: int | None
    text: str


class NodeLog:
    """One node's log, parsed incrementally: bytes in, whole lines (with their attempt) out."""

    def __init__(self, node: str, url: str) -> None:
        self.node = node
        self.url = url
        self.offset = 0
        self._partial = b""
        self._attempt: int | None = None

    def feed(self, data: bytes, final: bool = False) -> list[LogLine]:
        """The whole lines in `data` (appended to what came before); with `final`, the last,
        unterminated line too."""
        self.offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        last = chunks.pop()  # after the last newline: a line still being written, or nothing
        self._partial = b"" if final else last
        if final and last:
            chunks.append(last)
        lines = []
        for raw in chunks:
            text = raw.decode(errors="replace").rstrip("\r")
            marker = MARKER.match(text)
            if marker:
                self._attempt = int(marker.group(1))
            lines.append(LogLine(self.node, self._attempt, text))
        return lines


def read_from(store: JobStore, url: str, offset: int) -> bytes:
    """The bytes of `url` after `offset` (a local file is read from there; an object whole)."""
    if store.local:
        try:
            with open(url, "rb") as log:
                log.seek(offset)
                return log.read()
        except FileNotFoundError:
            return b""
    data = store.files.read(url)
    return b"" if data is None else data[offset:]


class RankMap:
    """Global rank of a log line, from the job's store (see the module docstring)."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self._exact: dict[tuple[str, int, int], int] = {}
        self._assumed: dict[tuple[str, int], int] = {}
        self._per_node: dict[int, int] = {}
        self._announced: set[tuple[str, int]] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the job's attempts and saved stack dumps (new attempts while following)."""
        record = self.store.read_state(self.job_id)
        for attempt in record.attempts:
            if attempt.nodes and attempt.world_size:
                per_node = attempt.world_size // len(attempt.nodes)
                self._per_node[attempt.number] = per_node
                for index, node in enumerate(attempt.nodes):
                    self._assumed[(node, attempt.number)] = index * per_node
        # Only the stack dumps' files are opened (event names carry their kind).
        page = read_page(self.store, self.job_id, EventQuery(kinds=frozenset({StacksSaved.KIND})))
        warn_skipped(page.problems)
        for event in page.events:
            if isinstance(event.data, StacksSaved) and event.node and event.attempt is not None:
                for dump in event.data.dumps:
                    rank, local = dump.get("rank"), dump.get("local_rank")
                    if isinstance(rank, int) and isinstance(local, int):
                        self._exact[(event.node, event.attempt, local)] = rank

    def rank_of(self, line: LogLine) -> int | None:
        """The line's global rank, or None when it names none (agent lines, markers)."""
        named = GLOBAL_PREFIX.match(line.text)
        if named:
            return int(named.group(1))
        local_match = LOCAL_PREFIX.match(line.text)
        if local_match is None or line.attempt is None:
            return None
        local = int(local_match.group(1))
        exact = self._exact.get((line.node, line.attempt, local))
        if exact is not None:
            return exact
        first = self._assumed.get((line.node, line.attempt))
        if first is None:
            self.refresh()
            first = self._assumed.get((line.node, line.attempt))
            if first is None:
                return None
        if (line.node, line.attempt) not in self._announced:
            self._announced.add((line.node, line.attempt))
            terminal.warn(
                escape(
                    f"{line.node}, attempt {line.attempt}: global ranks of [defaultN] lines "
                    f"assumed from the node order ({self._per_node[line.attempt]} per node): "
                    "torchrun's rendezvous may order nodes differently ([rankN] lines are exact)"
                )
            )
        return first + local


@dataclasses.dataclass(frozen=True)
class LogFilter:
    """Which lines `logs` shows."""

    nodes: frozenset[str]
    attempt: int | None
    rank: int | None
    pattern: re.Pattern[str] | None

    def keeps(self, line: LogLine, ranks: RankMap | None) -> bool:
        if self.nodes and line.node not in self.nodes:
            return False
        if self.attempt is not None and line.attempt != self.attempt:
            return False
        if self.pattern is not None and not self.pattern.search(line.text):
            return False
        return self.rank is None or (ranks is not None and ranks.rank_of(line) == self.rank)


def compile_grep(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as bad:
        raise UserError(
            f"not a valid regular expression: {bad.msg}"
            + (f" at position {bad.pos}" if bad.pos is not None else ""),
            where="--grep",
            value=pattern,
            fix="fix the pattern (Python `re` syntax); escape literal characters like [ ( * "
            "with a backslash",
        ) from None


class LogReader:
    """The job's node logs in the store; reads what was appended since the last read."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.directory = join(store.job_url(job_id), "logs")
        self.logs: dict[str, NodeLog] = {}

    def discover(self) -> None:
        for name in self.store.files.list(self.directory):
            if name.endswith(".log") and not name.startswith("."):
                node = name[: -len(".log")]
                if node not in self.logs:
                    self.logs[node] = NodeLog(node, join(self.directory, name))

    def read_new(self, final: bool = False) -> dict[str, list[LogLine]]:
        """Per node (sorted), the lines appended since the last call."""
        self.discover()
        return {
            node: log.feed(read_from(self.store, log.url, log.offset), final=final)
            for node, log in sorted(self.logs.items())
        }


def label(line: LogLine, show_attempt: bool) -> str:
    if not show_attempt:
        return line.node
    return f"{line.node}/{'-' if line.attempt is None else f'a{line.attempt}'}"


def write_lines(lines: Iterable[LogLine], show_attempt: bool, out: IO[str]) -> None:
    for line in lines:
        out.write(f"{label(line, show_attempt)}: {line.text}\n")
    out.flush()


def logs(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    node: list[str] = typer.Option([], "--node", help="Only this node (repeat for several)."),
    rank: int | None = typer.Option(None, "--rank", min=0, help="Only this global rank."),
    attempt: int | None = typer.Option(None, "--attempt", min=0, help="Only this attempt."),
    follow: bool = typer.Option(
        False, "-f", "--follow", help="Keep printing new lines until the job ends (or Ctrl-C)."
    ),
    tail: int | None = typer.Option(
        None, "--tail", min=0, help="Only the last K matching lines of each node."
    ),
    grep: str | None = typer.Option(None, "--grep", help="Only lines matching this regex."),
    interval: float = typer.Option(
        0.5, "--interval", min=0.05, help="Seconds between reads with -f."
    ),
    storage: str | None = STORAGE_OPTION,
) -> None:
    """Print a job's node logs from the store: node (and attempt) before each line."""
    try:
        show_logs(job_id, node, rank, attempt, follow, tail, grep, interval, storage)
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how one stops following: not an error (exit 0, nothing on stderr).
    except BrokenPipeError:  # `trainctl logs J | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit


def show_logs(
    job_id: str,
    node: list[str],
    rank: int | None,
    attempt: int | None,
    follow: bool,
    tail: int | None,
    grep: str | None,
    interval: float,
    storage: str | None,
) -> None:
    """`logs` (its options, as they came)."""
    selection = LogFilter(frozenset(node), attempt, rank, compile_grep(grep))
    store, job_id = open_job(storage, job_id)
    record = store.read_state(job_id)
    reader = LogReader(store, job_id)
    ranks = RankMap(store, job_id) if rank is not None else None
    first = reader.read_new(final=not follow)
    known_nodes = set(first) | {n.name for n in record.nodes}
    unknown = sorted(set(node) - known_nodes)
    if unknown and not follow:  # following: a spare may join later
        raise UserError(
            "no such node in this job",
            where="--node",
            value=unknown[0],
            fix="use one of " + (", ".join(sorted(known_nodes)) or "(no nodes yet)"),
        )
    attempts = {line.attempt for lines in first.values() for line in lines}
    if not follow and attempt is not None and attempt not in attempts:
        raise UserError(
            "no log section for this attempt",
            where="--attempt",
            value=attempt,
            fix="use one of "
            + (
                ", ".join(str(a) for a in sorted(a for a in attempts if a is not None))
                or "(no attempts logged)"
            ),
        )
    if not first and not follow:
        where = "" if store.local else " (an s3:// root gets them when the controller ends)"
        terminal.info(f"no node logs in the store for {job_id}{where}")
        return
    selected = {
        name: [line for line in lines if selection.keeps(line, ranks)]
        for name, lines in first.items()
    }
    if tail is not None:
        selected = {name: lines[-tail:] if tail else [] for name, lines in selected.items()}
    shown_attempts = {line.attempt for lines in selected.values() for line in lines}
    show_attempt = attempt is None and (follow or len(shown_attempts) > 1)
    for lines in selected.values():
        write_lines(lines, show_attempt, sys.stdout)
    if follow:
        follow_logs(store, job_id, reader, selection, ranks, interval, show_attempt)


def follow_logs(
    store: JobStore,
    job_id: str,
    reader: LogReader,
    selection: LogFilter,
    ranks: RankMap | None,
    interval: float,
    show_attempt: bool,
) -> None:
    """Print new lines every `interval` seconds until the job's state is final and its logs
    have stopped growing."""
    settle_s = 0.0 if store.local else REMOTE_SETTLE_S
    ended_at: float | None = None
    while True:
        time.sleep(interval)
        ended = store.read_state(job_id).state.terminal
        new = reader.read_new(final=ended)
        for lines in new.values():
            write_lines((x for x in lines if selection.keeps(x, ranks)), show_attempt, sys.stdout)
        if not ended:
            ended_at = None
            continue
        now = time.monotonic()
        if ended_at is None:
            ended_at = now
        elif not any(new.values()) and now - ended_at >= settle_s:
            return
