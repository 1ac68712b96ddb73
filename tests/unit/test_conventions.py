"""The CLI's conventions, command by command: results on stdout and chatter on stderr, -q/-v
accepted after the subcommand (and before it), --version, shell completion, every time in
--json as ISO 8601 with its zone, store files readable per the umask (secrets excepted).

The commands run in this process through `trainctl.cli.main.main` — the console script's own
entry point with its error boundary — on a store built here; nothing is launched.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from trainctl.cli.console import NORMAL, terminal
from trainctl.cli.main import main
from trainctl.cli.times import is_time_key
from trainctl.events import Event, JobCreated
from trainctl.health.verdict import HealthVerdict, NodeVerdictRecord, Verdict
from trainctl.secrets import JobSecrets
from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState, NodeRecord, NodeState
from trainctl.store import JobStore

JOB = "conv-20261204-0001"
NOW = time.time()


def write_job(storage: Path) -> JobStore:
    """A job that ran one attempt on two nodes and succeeded: state, spec, an event, verdicts."""
    store = JobStore(str(storage))
    record = JobRecord(job_id=JOB, name="conv", created_at=NOW - 600, updated_at=NOW - 60)
    record.nodes = [NodeRecord(name="node-0"), NodeRecord(name="node-1")]
    for node in record.nodes:
        node.state = NodeState.SUCCEEDED
    attempt = AttemptRecord(number=0, started_at=NOW - 590, nodes=["node-0", "node-1"])
    attempt.state, attempt.ended_at = AttemptState.SUCCEEDED, NOW - 70
    record.attempts.append(attempt)
    record.state, record.reason, record.step = JobState.SUCCEEDED, "done", 20
    store.create(record, "name: conv\nscript: train.py\n")
    store.append_event(JOB, Event(NOW - 600, "conv: 2 node(s)", JobCreated(target="train.py")))
    verdict = HealthVerdict(Verdict.OK, "gpus: no GPUs", {"gpus": {}})
    for node in ("node-0", "node-1"):
        store.write_node(
            JOB, node, NodeVerdictRecord(node, "preflight", NOW - 595, verdict).to_dict()
        )
    return store


@pytest.fixture
def job(storage: Path) -> Path:
    write_job(storage)
    (storage.parent / "train.py").write_text("print('hi')\n")
    return storage


def run(*args: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`trainctl ARGS` through `main()`: (exit code, stdout, stderr)."""
    terminal.verbosity = NORMAL  # a fresh process each time, as far as the CLI can tell
    monkeypatch.setattr(sys, "argv", ["trainctl", *args])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return int(done.value.code or 0), captured.out, captured.err


def commands(storage: Path) -> list[tuple[list[str], str]]:
    """Each command, and a text its result (stdout) holds ("": it answers nothing here)."""
    root = ["--storage", str(storage)]
    out = str(storage.parent / "timeline.html")
    return [
        (["list", *root], JOB),
        (["status", JOB, *root], "created "),
        (["events", JOB, *root], "job_created"),
        (["describe", JOB, *root], f"job_id: {JOB}"),
        (["logs", JOB, *root], ""),
        (["health", JOB, *root], "node-0"),
        (["report", JOB, "--out", out, *root], "goodput"),
        (["top", JOB, "--once", *root], "node-0"),
        (["metrics", JOB, *root], "trainctl_goodput_ratio"),
        (["ckpt", "ls", JOB, *root], ""),
        (["ckpt", "gc", JOB, *root], ""),
        (["cancel", JOB, *root], "succeeded"),
        (["resume", JOB, *root], ""),
        (["launch", str(storage.parent / "train.py"), "--dry-run", *root], "--tee=2"),
    ]


def test_quiet_after_each_command_leaves_only_the_result_on_stdout(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for args, result in commands(job):
        code, out, err = run(*args, "-q", capsys=capsys, monkeypatch=monkeypatch)
        assert code == 0, (args, err)
        assert err == "", (args, err)  # -q: only errors and results
        assert (result in out) if result else out == "", (args, out)


def test_without_quiet_the_chatter_is_on_stderr_and_the_result_unchanged(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chatter = {"logs": "no node logs", "ckpt": "no checkpoints", "resume": "already succeeded"}
    for args, result in commands(job):
        code, out, err = run(*args, capsys=capsys, monkeypatch=monkeypatch)
        assert code == 0, (args, err)
        assert (result in out) if result else out == "", (args, out)
        if args[0] in chatter and args[:2] != ["ckpt", "gc"]:
            assert chatter[args[0]] in err, (args, err)
    # before the subcommand works as it always did
    code, out, err = run("-q", "resume", JOB, "--storage", str(job), **_io(capsys, monkeypatch))
    assert (code, out, err) == (0, "", "")


def _io(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"capsys": capsys, "monkeypatch": monkeypatch}


def test_verbose_after_the_command_adds_detail_and_quiet_wins(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    io = _io(capsys, monkeypatch)
    _, out, err = run("health", JOB, "--storage", str(job), "-v", **io)
    assert "node-0 evidence:" in err and "node-0 evidence:" not in out
    _, _, err = run("health", JOB, "--storage", str(job), **io)
    assert "evidence" not in err
    _, _, err = run("-v", "resume", JOB, "--storage", str(job), "-q", **io)
    assert err == ""


def _times(value: Any, key: str = "") -> list[Any]:
    """Every value under a time key in a JSON document."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _times(v, k)]
    if isinstance(value, list):
        return [t for item in value for t in _times(item, key)]
    return [value] if is_time_key(key) and value is not None else []


def test_every_time_in_json_output_is_iso_8601_with_a_zone(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = 0
    for args, _ in commands(job):
        # logs: raw lines; launch --dry-run: a plan, no time; top, metrics: no JSON form
        if args[0] in ("logs", "launch", "top", "metrics"):
            continue
        code, out, err = run(*args, "--json", **_io(capsys, monkeypatch))
        assert code == 0, (args, err)
        for value in _times(json.loads(out)):
            assert isinstance(value, str), (args, value)
            assert datetime.fromisoformat(value).tzinfo is not None, (args, value)
            seen += 1
    assert seen > 20  # status, events, health, report, describe all carry times


def test_version_and_completion(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    io = _io(capsys, monkeypatch)
    code, out, _ = run("--version", **io)
    assert code == 0 and out.startswith("trainctl ") and "(torch " in out
    code, out, _ = run("--show-completion", "bash", **io)
    assert code == 0 and "_TRAINCTL_COMPLETE" in out and "trainctl" in out


def test_store_files_follow_the_umask_and_secrets_stay_private(
    storage: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trainctl.checkpoint.storage import open_storage

    previous = os.umask(0o022)
    try:
        write_job(storage)
        io = _io(capsys, monkeypatch)
        code, _, err = run("report", JOB, "--storage", str(storage), **io)  # into the job's dir
        assert code == 0, err
        picture = storage / "jobs" / JOB / "report.html"
        elsewhere = tmp_path / "timeline.svg"
        code, _, err = run("report", JOB, "--out", str(elsewhere), "--storage", str(storage), **io)
        assert code == 0, err
        checkpoints = open_storage(f"{storage}/checkpoints/{JOB}")
        checkpoints.put("step-00000010/.metadata", b"{}")
        secrets = storage / "jobs" / JOB / "private" / "secrets.json"
        JobSecrets({"TOKEN": "x"}, {}).write(secrets)
    finally:
        os.umask(previous)
    job_dir = storage / "jobs" / JOB
    shared = [
        job_dir / "state.json",
        *(job_dir / "node-shards").glob("*.json"),
        *(job_dir / "attempts").glob("*.json"),
        job_dir / "spec.yaml",
        *(job_dir / "nodes").glob("*.json"),
        *(job_dir / "events").glob("*.json"),
        picture,
        elsewhere,
        storage / "checkpoints" / JOB / "step-00000010" / ".metadata",
    ]
    assert len(shared) == 8 + 3  # a node shard, an attempt and its node list
    for path in shared:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets.parent.stat().st_mode) == 0o700
