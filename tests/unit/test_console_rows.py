"""Long listings: aligned lines past `TABLE_ROWS`, node names counted past `LISTED_NAMES`,
and the CLI's imports (every command pays them: `status` must not load torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainctl.cli import console
from trainctl.cli.console import aligned_lines, names_cell


def test_aligned_lines_pad_every_column_to_its_widest_cell() -> None:
    lines = aligned_lines(
        ("NODE", "STATE", "REASON"), [("node-10", "ok", ""), ("n", "failed", "x y")]
    )
    assert lines == ["NODE     STATE   REASON", "node-10  ok", "n        failed  x y"]


def test_past_table_rows_a_listing_is_aligned_lines_with_every_row(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [(f"node-{i}", "running", "[/gloo] not markup") for i in range(console.TABLE_ROWS + 1)]
    console.emit_rows(("NODE", "STATE", "REASON"), rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NODE", "STATE", "REASON"]
    assert len(out) == len(rows) + 1 and out[-1].endswith("[/gloo] not markup")
    assert len({line.index("running") for line in out[1:]}) == 1  # one column


@pytest.mark.parametrize(
    ("count", "cell"),
    [(1, "node-0"), (3, "node-0,node-1,node-2"), (17, "17 nodes: node-0 … node-16")],
)
def test_node_names_are_listed_then_counted(count: int, cell: str) -> None:
    assert names_cell([f"node-{i}" for i in range(count)]) == cell


def test_the_cli_does_not_import_torch() -> None:
    code = "import sys, trainctl.cli.main; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
