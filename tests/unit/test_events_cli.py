"""`trainctl events` at scale: the newest page by default, --limit/--since/--until/--kind,
--all streamed (text and one JSON array), contradictory options refused with exit 2, and the
--all listing as a golden file. Runs in this process through the console script's `main()`.

Regenerate the golden file after a deliberate change with TRAINCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_oncall_cli import check_golden
from trainctl.cli.console import NORMAL, terminal
from trainctl.cli.event_log import DEFAULT_LIMIT
from trainctl.cli.main import main
from trainctl.events import Event, FirstStep, NodeExited
from trainctl.exitcodes import ExitCode
from trainctl.state import JobRecord
from trainctl.store import JobStore

JOB = "evcli-20261204-0001"
CREATED = 1764547200.0  # 2025-12-01T00:00:00Z


def write_job(storage: Path, count: int) -> None:
    store = JobStore(str(storage))
    store.create(JobRecord(JOB, "evcli", created_at=CREATED, updated_at=CREATED), "name: e\n")
    for i in range(count):
        data = NodeExited(code=i) if i % 3 else FirstStep(step=i)
        node = f"node-{i % 4}" if i % 3 else None
        store.append_event(JOB, Event(CREATED + i * 0.25, f"event {i}", data, node=node))


def run(storage: Path, *args: str, **io: Any) -> tuple[int, str, str]:
    capsys, monkeypatch = io["capsys"], io["monkeypatch"]
    terminal.verbosity = NORMAL
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", ["trainctl", "events", JOB, "--storage", str(storage), *args])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return int(done.value.code or 0), captured.out, captured.err


@pytest.fixture
def io(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"capsys": capsys, "monkeypatch": monkeypatch}


def test_default_is_the_newest_page_and_says_what_it_left_out(
    storage: Path, io: dict[str, Any]
) -> None:
    write_job(storage, DEFAULT_LIMIT + 40)
    code, out, err = run(storage, "--json", **io)
    listed = json.loads(out)
    assert code == 0 and len(listed) == DEFAULT_LIMIT
    assert listed[0]["message"] == "event 40" and listed[-1]["message"] == f"event {239}"
    assert f"the newest {DEFAULT_LIMIT} of 240 events" in err
    code, out, err = run(storage, "-n", "3", **io)
    assert code == 0 and [line.split()[-1] for line in out.splitlines()[1:]] == [
        "237",
        "238",
        "239",
    ]
    _, _, err = run(storage, "-n", "3", "-q", **io)
    assert err == ""


def test_all_streams_every_event_as_one_json_array_or_lines(
    storage: Path, io: dict[str, Any]
) -> None:
    write_job(storage, DEFAULT_LIMIT + 40)
    code, out, err = run(storage, "--all", "--json", **io)
    listed = json.loads(out)
    assert code == 0 and err == ""
    assert [e["message"] for e in listed] == [f"event {i}" for i in range(240)]
    assert listed[0]["time"] == "2025-12-01T00:00:00+00:00"  # ISO 8601, as every --json
    code, out, _ = run(storage, "--all", **io)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 241 and lines[0].split() == ["T+", "KIND", "NODE", "MESSAGE"]


def test_filters(storage: Path, io: dict[str, Any]) -> None:
    write_job(storage, 30)
    since, until = "2025-12-01T00:00:02+00:00", "2025-12-01T00:00:04+00:00"
    code, out, _ = run(storage, "--since", since, "--until", until, "--json", **io)
    assert code == 0
    assert [e["message"] for e in json.loads(out)] == [f"event {i}" for i in range(8, 17)]
    code, out, _ = run(storage, "--kind", "first_step", "--all", "--json", **io)
    assert [e["message"] for e in json.loads(out)] == [f"event {i}" for i in range(0, 30, 3)]
    code, out, err = run(storage, "--kind", "no_such_kind", "--all", **io)
    assert (code, out) == (0, "") and "no events match" in err
    code, out, _ = run(storage, "--kind", "no_such_kind", "--all", "--json", **io)
    assert json.loads(out) == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--all", "--limit", "5"], "--limit"),
        (["--until", "yesterday-ish"], "--until"),
        (["--since", "1h", "--until", "2h"], "--until"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_contradictions_are_bad_input(
    storage: Path, io: dict[str, Any], args: list[str], named: str
) -> None:
    write_job(storage, 3)
    code, out, err = run(storage, *args, **io)
    assert code == int(ExitCode.BAD_INPUT) and out == ""
    assert named in err and "Traceback" not in err


def test_all_listing_golden(storage: Path, io: dict[str, Any]) -> None:
    write_job(storage, 7)
    code, out, _ = run(storage, "--all", **io)
    assert code == 0
    check_golden("events-all.txt", out)
