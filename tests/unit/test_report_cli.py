"""`trainctl report`: run as a user would (a subprocess, sealed environment) on a job store built
from synthetic events; checks the JSON contract, the HTML/SVG/PNG pictures and the errors
(a bad `--out` suffix against its golden message)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.test_storage_errors_cli import Run, check_error
from tests.conftest import REPO, sealed_env
from tests.unit.test_goodput import node_failure_with_spare
from trainctl.cli.times import iso_time
from trainctl.exitcodes import ExitCode
from trainctl.state import JobRecord, JobState
from trainctl.store import JobStore

JOB = "nf-1"


def run(*args: str, storage: Path) -> subprocess.CompletedProcess[str]:
    """`trainctl ARGS` in the sealed CLI environment (the report starts no job processes)."""
    return subprocess.run(
        ["timeout", "-s", "KILL", "60", sys.executable, "-m", "trainctl.cli.main", *args],
        cwd=REPO,
        env=sealed_env(storage),
        capture_output=True,
        text=True,
    )


def write_job_store(storage: Path) -> Path:
    """A store holding one finished job: a node failure recovered on a spare (132 s wall)."""
    _, events, _ = node_failure_with_spare()
    store = JobStore(str(storage))
    # state.json without attempts: the report must work from the events alone
    store.write_state(
        JobRecord(JOB, "tiny-gpt", created_at=0.0, updated_at=0.0, state=JobState.SUCCEEDED)
    )
    for event in events:
        store.append_event(JOB, event)
    return storage


@pytest.fixture
def job_store(storage: Path) -> Path:
    return write_job_store(storage)


def self_contained(page: str) -> None:
    """Nothing in `page` is fetched when it opens: no script, no link, every reference is to
    an id inside the page."""
    for outside in ("<script", "<link", "src=", "<iframe", "@import"):
        assert outside not in page, outside
    references = re.findall(r'href="([^"]*)"|url\(([^)]*)\)', page)
    assert all((href or url).startswith("#") for href, url in references), references


def svg_of(html: str) -> ET.Element:
    """The inline SVG of the HTML page, parsed (it must be well-formed XML)."""
    match = re.search(r"<svg.*?</svg>", html, flags=re.S)
    assert match, "no <svg> in the page"
    return ET.fromstring(match.group(0))


def test_json_is_the_ledger_and_the_picture_path(job_store: Path) -> None:
    result = run("report", JOB, "--json", storage=job_store)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["wall_s"] == pytest.approx(132)
    assert report["goodput"] == pytest.approx(98 / 132)
    assert report["categories"] == pytest.approx(
        {
            "productive": 98,
            "checkpoint_stall": 1,
            "startup": 10,
            "failure_detection": 4.5,
            "restart": 6,
            "restore": 2,
            "replayed": 9,
            "waiting": 1.5,
        }
    )
    assert [(a["number"], a["outcome"], a["nodes"]) for a in report["attempts"]] == [
        (1, "failed", ["n0", "n1"]),
        (2, "succeeded", ["n0", "n2"]),
    ]
    (failure,) = report["failures"]
    assert (failure["node"], failure["cause"]) == ("n1", "node_fault")
    assert failure["time"] == iso_time(59.5)  # every time in --json: ISO 8601 with its zone
    picture = Path(report["picture"])
    assert picture == job_store / "jobs" / JOB / "report.html"
    page = picture.read_text()
    assert page.startswith("<!doctype html>")
    self_contained(page)
    svg = svg_of(page)
    titles = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert any("n1: node agent lost" in t for t in titles), "failure reason as a tooltip"
    assert any(t.startswith("checkpoint step 40") for t in titles), "checkpoint tick"
    assert any("failure_detection" in t for t in titles), "a bar's category"
    words = " ".join(svg.itertext())
    for expected in ("attempt 1 · n1", "attempt 2 · n2", "n1: node_fault", "node excluded"):
        assert expected in words, expected


def test_human_report_goes_to_stdout(job_store: Path) -> None:
    result = run("report", JOB, storage=job_store)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{JOB}  succeeded  wall 2m12s  goodput 74.2%")
    row = next(line for line in lines if line.startswith("failure_detection"))
    assert row.split() == ["failure_detection", "4.5", "3.4%"]
    failure = "failed at T+59.5s: attempt 1 on n1 (node_fault): n1: node agent lost"
    assert failure in lines
    assert lines[-1] == f"timeline: {job_store / 'jobs' / JOB / 'report.html'}"


def test_png_out_is_the_timeline(job_store: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "timeline.PNG"
    result = run("report", JOB, "--json", "--out", str(out), storage=job_store)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["picture"] == str(out)
    image = Image.open(io.BytesIO(out.read_bytes()))
    assert image.format == "PNG" and image.width == 1200 and image.height > 300
    colours = {colour[:3] for _, colour in image.getcolors(maxcolors=1 << 24) or []}
    assert (0x43, 0xA0, 0x47) in colours, "productive time is drawn"
    assert len(colours) > 50, "with text (anti-aliased glyphs)"


def test_svg_out_is_well_formed(job_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "timeline.svg"
    assert run("report", JOB, "--out", str(out), storage=job_store).returncode == 0
    root = ET.fromstring(out.read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "attempt 2 · n0" in " ".join(root.itertext())


def test_unknown_job_is_one_clear_error(storage: Path) -> None:
    result = run("report", "nope", storage=storage)
    assert result.returncode == ExitCode.BAD_INPUT
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {storage}: no such job (got 'nope')"]


def test_out_in_a_missing_directory_is_bad_input(job_store: Path, tmp_path: Path) -> None:
    result = run("report", JOB, "--out", str(tmp_path / "no" / "x.png"), storage=job_store)
    assert result.returncode == ExitCode.BAD_INPUT
    assert "--out: the directory for the picture does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("name", ["r.jpg", "r.json", "report", "r.html.gz"])
def test_out_with_a_suffix_trainctl_cannot_write_is_bad_input(
    job_store: Path, tmp_path: Path, name: str
) -> None:
    """`--out r.jpg` wrote an HTML page into the .jpg file; now: one message, exit 2, nothing
    written (the job is not even read)."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    done = run("report", JOB, "--out", str(tmp_path / name), storage=job_store)
    golden = "report-out-suffix.txt" if name == "r.jpg" else None
    if golden:
        check_error(
            Run(done.returncode, done.stdout, done.stderr),
            ExitCode.BAD_INPUT,
            golden,
            {str(tmp_path): "<tmp>"},
        )
    assert done.returncode == ExitCode.BAD_INPUT and done.stdout == ""
    assert f"--out: trainctl cannot write this kind of file (got '{tmp_path / name}')" in (
        done.stderr
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
