"""The HTML report in a real browser: `trainctl report` writes the page, headless Chromium opens
it from disk (nothing else to fetch), and what it shows is checked — a screenshot with
something drawn on it, and page text holding the title, the lane names, the failure's label and
the legend. The real-job version of this check is in tests/e2e/test_recovery.py."""

from __future__ import annotations

from pathlib import Path

from tests.browser import check_report_page
from tests.unit.test_report_cli import JOB, run, write_job_store


def test_report_page_in_headless_chromium(storage: Path, tmp_path: Path) -> None:
    write_job_store(storage)
    page = tmp_path / "report.html"
    result = run("report", JOB, "--out", str(page), storage=storage)
    assert result.returncode == 0, result.stderr
    lanes = ["attempt 1 · n0", "attempt 1 · n1", "attempt 2 · n0", "attempt 2 · n2"]
    check_report_page(page, tmp_path, lanes, ["n1: node_fault"])
