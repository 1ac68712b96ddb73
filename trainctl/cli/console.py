"""The one console for humans (stderr) and the one writer for results (stdout).

stdout is a contract: only what a script would parse goes there (a job id, a table of jobs,
log lines, one JSON object).
Everything for people goes to stderr through one rich Console, gated by -q/-v and honouring
NO_COLOR (rich reads it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trainctl.cli.times import format_age, iso_timestamps

__all__ = ["format_age"]  # re-exported: the commands take their time helpers from here too

QUIET, NORMAL, VERBOSE = -1, 0, 1


class Terminal:
    """Owns the stderr console and the verbosity level."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        # Results for scripts and pipes (tables, listings): stdout, same width and colour rules.
        self.out = Console(highlight=False, soft_wrap=True)
        self.verbosity = NORMAL

    def info(self, message: str) -> None:
        """A normal progress line (hidden by -q)."""
        if self.verbosity >= NORMAL:
            self.console.print(message)

    def detail(self, message: str) -> None:
        """A line shown only with -v."""
        if self.verbosity >= VERBOSE:
            self.console.print(message, style="dim")

    def warn(self, message: str) -> None:
        """A warning (shown even with -q)."""
        self.console.print(f"[yellow]warning:[/yellow] {message}")

    def error(self, message: str) -> None:
        """An error (always shown). The message is printed verbatim, never as markup."""
        self.console.print("[red]error:[/red] ", end="")
        self.console.print(message, markup=False)


terminal = Terminal()


class PlainTable(Table):
    """A table whose string cells are shown verbatim: they hold data from the store (error
    messages like ``[/gloo/.../pair.cc:553] Connection closed``), never markup."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(
            *(Text(cell) if isinstance(cell, str) else cell for cell in renderables), **kwargs
        )


def plain_table(*columns: str, title: str | None = None) -> Table:
    """The borderless table every listing uses (fits COLUMNS=80, copy-paste friendly)."""
    table = PlainTable(box=None, pad_edge=False, title=title)
    for column in columns:
        table.add_column(column)
    return table


def emit_result(text: str) -> None:
    """Write one machine-readable line to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit_table(table: Table) -> None:
    """Write a result table to stdout (so `trainctl list | grep x` works)."""
    terminal.out.print(table)


def emit_json(obj: Any) -> None:
    """Write one JSON object to stdout, every Unix time in it as ISO 8601 with its zone."""
    emit_result(json.dumps(iso_timestamps(obj), sort_keys=True, default=str))


TABLE_ROWS = 256
"""Up to this many rows print as a rich table; more are written as aligned lines."""
LISTED_NAMES = 16
"""Up to this many node names are listed in a table cell; more are counted."""


def aligned_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A table as plain lines, each column as wide as its widest cell (the last one unpadded).
    What a long listing prints instead of a rich table, which renders and measures every
    cell before printing the first row (2.2 s of `status` for 1,024 nodes)."""
    widths = [
        max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)
    ]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in (headers, *rows)
    ]


def emit_rows(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A result table on stdout: a rich table up to `TABLE_ROWS` rows, aligned lines past it."""
    if len(rows) <= TABLE_ROWS:
        table = plain_table(*headers)
        for row in rows:
            table.add_row(*row)
        emit_table(table)
        return
    out = terminal.out.file
    out.write("".join(line + "\n" for line in aligned_lines(headers, rows)))
    out.flush()


def names_cell(names: Sequence[str]) -> str:
    """Node names for a table cell: all of them up to `LISTED_NAMES`, else a count and the
    first and last (`--json` has them all)."""
    if len(names) <= LISTED_NAMES:
        return ",".join(names)
    return f"{len(names)} nodes: {names[0]} … {names[-1]}"
