"""The on-call commands as a user runs them (a subprocess, NO_COLOR=1, fixed COLUMNS) on job
stores built here from synthetic state, events and node logs: `logs` (filters, tail, grep,
attempt sections, ranks, `-f` while a test thread writes), `list` (filters, order, ids whole at
60 columns, on stdout), `describe` (secrets hidden) and job id prefixes in every command.
No job is launched.

Regenerate the golden files after a deliberate change with TRAINCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from subprocess import Popen
from typing import IO

import pytest
import yaml

from tests.conftest import REPO, sealed_env
from tests.e2e.harness import trainctl
from trainctl.events import Event, StacksSaved
from trainctl.exitcodes import ExitCode
from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState, NodeRecord
from trainctl.store import JobStore

GOLDEN = REPO / "tests" / "golden"
JOB = "train-20261204-0001"
OTHER = "train-20261204-0002"
CREATED = 1764547200.0  # 2025-12-01T00:00:00Z

NODE_LOGS = {
    "node-0": (
        "agent ready\n"
        "--- attempt 0 on node-0\n"
        "[default0]:step 1 loss=2.5\n"
        "[default1]:step 1 loss=2.5\n"
        "[default0]:step 2 loss=2.0\n"
        "--- attempt 1 on node-0\n"
        "[default0]:restored step 2\n"
        "[default1]:restored step 2\n"
        "[default0]:step 3 loss=1.5\n"
    ),
    "node-1": (
        "--- attempt 0 on node-1\n"
        "[default0]:step 1 loss=2.5\n"
        "[default1]:step 1 loss=2.5\n"
        "[default0]:[rank3]: Traceback (most recent call last):\n"
        "[default0]:[rank3]: RuntimeError: [/gloo/pair.cc:553] Connection closed\n"
    ),
    "node-2": ("--- attempt 1 on node-2\n[default0]:restored step 2\n[default1]:restored step 2\n"),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def attempt(number: int, nodes: list[str], state: AttemptState) -> AttemptRecord:
    record = AttemptRecord(number=number, started_at=CREATED + number, nodes=nodes, world_size=4)
    record.state = state
    return record


def write_job(store: JobStore, job_id: str, state: JobState, spec: str = "name: train\n") -> None:
    record = JobRecord(job_id, "train", created_at=CREATED, updated_at=CREATED, state=state)
    record.nodes = [NodeRecord(name) for name in NODE_LOGS]
    record.attempts = [
        attempt(0, ["node-0", "node-1"], AttemptState.FAILED),
        attempt(1, ["node-0", "node-2"], AttemptState.SUCCEEDED),
    ]
    store.create(record, spec)


@pytest.fixture
def job_store(storage: Path) -> JobStore:
    """Two jobs sharing a prefix; the first with three node logs over two attempts, and the
    stack dumps of attempt 0 on node-1 (which say its local rank 0 was global rank 3)."""
    store = JobStore(str(storage))
    write_job(store, JOB, JobState.SUCCEEDED)
    write_job(store, OTHER, JobState.FAILED)
    dumps = [{"rank": 3, "local_rank": 0, "pid": 1}, {"rank": 2, "local_rank": 1, "pid": 2}]
    store.append_event(
        JOB, Event(CREATED + 5, "stacks", StacksSaved(dumps=dumps), node="node-1", attempt=0)
    )
    logs = storage / "jobs" / JOB / "logs"
    logs.mkdir()
    for node, text in NODE_LOGS.items():
        (logs / f"{node}.log").write_text(text)
    return store


# -- logs ------------------------------------------------------------------------------------
LOG_CASES = {
    "logs-all.txt": [],
    "logs-node-attempt.txt": ["--node", "node-0", "--attempt", "1"],
    "logs-tail.txt": ["--tail", "2"],
    "logs-grep.txt": ["--grep", r"loss=2\.\d|Error"],
    "logs-rank.txt": ["--rank", "3"],
    "logs-attempt-grep-tail.txt": ["--attempt", "0", "--grep", "step", "--tail", "1"],
}


@pytest.mark.parametrize(("golden", "args"), LOG_CASES.items())
def test_logs_golden(job_store: JobStore, storage: Path, golden: str, args: list[str]) -> None:
    result = trainctl("logs", JOB, *args, storage=storage)
    assert result.returncode == 0, result.stderr
    check_golden(golden, result.stdout)
    if golden == "logs-rank.txt":
        # node-1 in attempt 0: exact, from its stack dumps; elsewhere the node order, said so
        assert "node-2, attempt 1: global ranks of [defaultN] lines assumed" in result.stderr
        assert "node-0, attempt 0: global ranks" in result.stderr
        assert "node-1" not in result.stderr
    else:
        assert result.stderr == ""


def test_logs_bad_input_is_one_message_and_exit_2(job_store: JobStore, storage: Path) -> None:
    for args, message in (
        (["--grep", "loss=("], "--grep: not a valid regular expression: missing ), unterminated"),
        (["--node", "node-9"], "--node: no such node in this job (got 'node-9')"),
        (["--attempt", "7"], "--attempt: no log section for this attempt (got 7)"),
        (["--tail", "-1"], "Invalid value for '--tail'"),
    ):
        result = trainctl("logs", JOB, *args, storage=storage)
        assert result.returncode == ExitCode.BAD_INPUT, (args, result.stderr)
        assert message in result.stderr, args
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_logs_of_a_job_without_logs(job_store: JobStore, storage: Path) -> None:
    result = trainctl("logs", OTHER, storage=storage)
    assert result.returncode == 0 and result.stdout == ""
    assert f"no node logs in the store for {OTHER}" in result.stderr


def start_follow(storage: Path, *args: str, stderr: IO[str] | None = None) -> Popen[str]:
    """`trainctl logs ARGS -f` in the background, its stdout a pipe (stderr: a file or a pipe)."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainctl.cli.main", "logs", *args, "-f", "--interval", "0.1"],
        cwd=REPO,
        env=sealed_env(storage),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
    )


def test_logs_follow_sees_a_new_attempt_and_stops_when_the_job_ends(
    job_store: JobStore, storage: Path, tmp_path: Path
) -> None:
    record = job_store.read_state(JOB)
    record.state = JobState.RUNNING
    job_store.write_state(record)
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        follower = start_follow(storage, JOB, "--node", "node-0", "--node", "node-3", stderr=stderr)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "node-0/-: agent ready\n"  # following has begun
        logs = storage / "jobs" / JOB / "logs"

        def relaunch_then_finish() -> None:
            time.sleep(0.3)
            with open(logs / "node-0.log", "a") as log:
                log.write("--- attempt 2 on node-0\n[default0]:step 4 loss=1.")
                log.flush()
                time.sleep(0.3)  # a line written in two pieces is printed once, whole
                log.write("0\n")
            (logs / "node-3.log").write_text("--- attempt 2 on node-3\n[default0]:spare up\n")
            time.sleep(0.3)
            record.state = JobState.SUCCEEDED
            job_store.write_state(record)

        writer = threading.Thread(target=relaunch_then_finish)
        writer.start()
        # read() through the same buffered reader as readline (communicate() would skip what
        # that reader already buffered); the job's end closes the pipe
        out = follower.stdout.read()
        follower.wait(timeout=30)
        writer.join()
    finally:
        follower.kill()
    err = errors.read_text()
    assert follower.returncode == 0, err
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(NODE_LOGS["node-0"].splitlines()) - 1 + 4  # every line once
    assert lines[-5:] == [
        "node-0/a1: [default0]:step 3 loss=1.5",
        "node-0/a2: --- attempt 2 on node-0",
        "node-0/a2: [default0]:step 4 loss=1.0",
        "node-3/a2: --- attempt 2 on node-3",
        "node-3/a2: [default0]:spare up",
    ]


def test_logs_follow_ends_quietly_on_ctrl_c(job_store: JobStore, storage: Path) -> None:
    record = job_store.read_state(JOB)
    record.state = JobState.RUNNING
    job_store.write_state(record)
    follower = start_follow(storage, JOB, "--tail", "1")
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "node-0/a1: [default0]:step 3 loss=1.5\n"
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0
    assert "Traceback" not in err and "error" not in err


# -- list ------------------------------------------------------------------------------------
LONG_ID = "tiny-gpt-20261204-0001-with-a-long-suffix"


@pytest.fixture
def many_jobs(storage: Path) -> JobStore:
    """Four jobs 1 h, 5 h, 2 d and 10 d old, in three states, with long ids and names."""
    store = JobStore(str(storage))
    now = time.time()
    for job_id, name, state, age_s in (
        ("dcnv2-20261125-0001", "dcnv2", JobState.SUCCEEDED, 10 * 86400),
        (LONG_ID, "tiny-gpt", JobState.FAILED, 5 * 3600),
        ("tiny-gpt-20261202-0001", "tiny-gpt", JobState.SUCCEEDED, 2 * 86400),
        ("ranker-20261204-0001", "a ranking model with a long name", JobState.RUNNING, 3600),
    ):
        created = now - age_s
        record = JobRecord(job_id, name, created_at=created, updated_at=created, state=state)
        store.create(record, f"name: {name}\n")
    return store


@pytest.mark.parametrize("columns", ["80", "60"])
def test_list_is_a_table_on_stdout_newest_first_ids_whole(
    many_jobs: JobStore, storage: Path, columns: str
) -> None:
    result = trainctl("list", storage=storage, COLUMNS=columns)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_golden(f"list-{columns}.txt", result.stdout)
    assert LONG_ID in result.stdout, "the job id is never cut"
    assert all(len(line) <= int(columns) for line in result.stdout.splitlines())


def ids(result_stdout: str) -> list[str]:
    return [job["job_id"] for job in json.loads(result_stdout)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["ranker-20261204-0001", LONG_ID, "tiny-gpt-20261202-0001", "dcnv2-20261125-0001"]),
        (["--state", "failed", "--state", "RUNNING"], ["ranker-20261204-0001", LONG_ID]),
        (["--since", "3d"], ["ranker-20261204-0001", LONG_ID, "tiny-gpt-20261202-0001"]),
        (["--since", "90m"], ["ranker-20261204-0001"]),
        (["--name", "tiny"], [LONG_ID, "tiny-gpt-20261202-0001"]),
        (["--name", "*RANKING*"], ["ranker-20261204-0001"]),
        (["--name", "tiny-*", "--state", "succeeded"], ["tiny-gpt-20261202-0001"]),
        (["--since", "2000-01-01"], None),
        (["--since", "2999-01-01T00:00+00:00"], []),
    ],
)
def test_list_filters(
    many_jobs: JobStore, storage: Path, args: list[str], expected: list[str] | None
) -> None:
    result = trainctl("list", "--json", *args, storage=storage)
    assert result.returncode == 0, result.stderr
    if expected is None:  # every job
        expected = ids(trainctl("list", "--json", storage=storage).stdout)
    assert ids(result.stdout) == expected


def test_list_filters_that_match_nothing_say_so(many_jobs: JobStore, storage: Path) -> None:
    result = trainctl("list", "--name", "nope", storage=storage)
    assert result.returncode == 0 and result.stdout == ""
    assert "none of the 4 jobs under" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since: not an age or a date (got 'yesterday')"),
        (["--state", "done"], "--state: not a job state (got 'done')"),
    ],
)
def test_list_bad_filters_exit_2(
    many_jobs: JobStore, storage: Path, args: list[str], message: str
) -> None:
    result = trainctl("list", *args, storage=storage)
    assert result.returncode == ExitCode.BAD_INPUT
    assert message in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# -- describe --------------------------------------------------------------------------------
STORED_SPEC = """\
name: train
script: recipes/train.py
nodes: 2
nproc_per_node: 2
env:
  LOG_LEVEL: info
  HF_TOKEN: hf_written_by_an_older_release
secrets:
  WANDB_API_KEY: '***'
checkpoint:
  storage: s3://bucket/ckpt
  storage_options:
    endpoint_url: http://minio:9000
    key: '***'
    secret: '***'
"""


def test_describe_shows_the_spec_with_secrets_hidden(storage: Path) -> None:
    store = JobStore(str(storage))
    write_job(store, JOB, JobState.FAILED, spec=STORED_SPEC)
    record = store.read_state(JOB)
    record.reason = "crash loop: node-1 failed 3 times"
    store.write_state(record)
    result = trainctl("describe", "train-20261204-000", storage=storage)
    # the prefix is ambiguous only when two jobs exist; here it names one
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    described = yaml.safe_load(result.stdout)
    described["updated_at"] = "<updated>"
    check_golden("describe.yaml", yaml.safe_dump(described, sort_keys=False))
    assert "hf_written_by_an_older_release" not in result.stdout
    assert described["spec"]["env"] == {"LOG_LEVEL": "info", "HF_TOKEN": "***"}
    assert described["spec"]["checkpoint"]["storage_options"]["secret"] == "***"
    assert described["created_at"] == "2025-12-01T00:00:00+00:00"
    as_json = trainctl("describe", JOB, "--json", storage=storage).json()
    assert as_json["state"] == "failed" and as_json["scheduler"] == "local"
    assert as_json["spec"]["secrets"] == {"WANDB_API_KEY": "***"}


# -- job id prefixes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [["status"], ["events"], ["describe"], ["logs"], ["report"], ["health"], ["ckpt", "ls"]],
)
def test_every_command_takes_a_unique_prefix(
    job_store: JobStore, storage: Path, command: list[str]
) -> None:
    write_job(job_store, "dcnv2-20261201-0001", JobState.SUCCEEDED)
    unique = (
        trainctl(*command, "dcn", "--json", storage=storage)
        if command[0] != "logs"
        else (trainctl(*command, "dcn", storage=storage))
    )
    # health exits 1 when the job has no node verdicts: the prefix still resolved
    assert unique.returncode in (0, 1) and "Traceback" not in unique.stderr, unique.stderr
    if command[0] not in ("logs", "events"):
        assert "dcnv2-20261201-0001" in unique.stdout
    ambiguous = trainctl(*command, "train-", storage=storage)
    assert ambiguous.returncode == ExitCode.BAD_INPUT, ambiguous.stderr
    assert f"ambiguous job id prefix: 2 jobs match: {JOB}, {OTHER}" in ambiguous.stderr


def test_prefix_resolution_unique_ambiguous_none(job_store: JobStore, storage: Path) -> None:
    store = JobStore(str(storage))
    write_job(store, "dcnv2-20261201-0001", JobState.SUCCEEDED)
    unique = trainctl("describe", "dcn", "--json", storage=storage)
    assert unique.returncode == 0, unique.stderr
    assert unique.json()["job_id"] == "dcnv2-20261201-0001"
    exact = trainctl("status", JOB, "--json", storage=storage)
    assert exact.json()["job_id"] == JOB
    ambiguous = trainctl("status", "train", storage=storage)
    assert ambiguous.returncode == ExitCode.BAD_INPUT
    assert ambiguous.stderr == (
        f"error: JOB: ambiguous job id prefix: 2 jobs match: {JOB}, {OTHER} (got 'train')\n"
        "  fix: type more of the job id (`trainctl list` shows them whole)\n"
    )
    assert ambiguous.stdout == ""
    for command in (["status"], ["logs"], ["describe"], ["ckpt", "ls"]):
        missing = trainctl(*command, "nope", storage=storage)
        assert missing.returncode == ExitCode.BAD_INPUT, command
        assert "no such job" in missing.stderr and "(got 'nope')" in missing.stderr, command
        assert "Traceback" not in missing.stderr and missing.stdout == ""
