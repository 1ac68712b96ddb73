"""The process group's collective timeout and the on-demand flight recorder, on real gloo ranks.

Two ranks under real torchrun, started through `trainctl.runtime` (the code every recipe runs):

- after its warm-up steps the runtime derives the collective timeout from its step times and
  applies it to the process group: a collective whose peer never comes fails on that timeout
  (here a few seconds), long before torch's default (30 minutes for gloo) or the timeout the
  group started with;
- each rank serves torch's debug handlers on a Unix socket: the agent's reader gets both
  ranks' flight recorders while one of them spins in Python holding the GIL, and the
  recorders show which rank never entered the collective the other waits in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import assert_no_leftovers, job_processes
from trainctl.health import flight_recorder
from trainctl.recovery.hangs import Hang, SilentRank, localise_hang

SCRIPT = Path(__file__).parent / "scripts" / "collectives.py"
REPO = Path(__file__).resolve().parents[2]


def start(mode: str, tmp_path: Path, **extra: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TRAINCTL_JOB_ID": f"collectives-{mode}-{os.getpid()}",
        "TORCH_FR_BUFFER_SIZE": "100",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port: never torchrun's fixed default 29500
            "--nproc-per-node=2",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            str(SCRIPT),
            mode,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        # torchrun starts its workers in sessions of their own: they are found by the job tag
        # every process of the run carries, killed, and then none may be left.
        job = f"collectives-{process.args[-1]}-{os.getpid()}"  # type: ignore[index]
        for pid in job_processes(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert_no_leftovers(job)


def read_until(
    process: subprocess.Popen[str], wanted: str, deadline: float, times: int = 1
) -> list[str]:
    """Lines of output until `wanted` appeared `times` times (ranks share the pipe)."""
    assert process.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "".join(lines).count(wanted) >= times:
            return lines
    raise AssertionError(f"never saw {wanted!r}; output:\n{''.join(lines)}")


def test_a_collective_whose_peer_never_comes_fails_on_the_derived_timeout(
    tmp_path: Path, launched: list[subprocess.Popen[str]]
) -> None:
    health = {
        "hang_floor_s": 2.0,
        "hang_k": 2.0,
        "stack_dump_timeout_s": 1.0,
        "first_step_allowance_s": 600.0,
    }
    process = start("timeout", tmp_path, TRAINCTL_HEALTH=json.dumps(health))
    launched.append(process)
    deadline = time.monotonic() + 90
    lines = read_until(process, "COLLECTIVE", deadline)
    text = "".join(lines)
    # the group started with 600 + 2 + 60 s; from the step times it derived 2 x (2 + 1) s
    assert "collective timeout now 6 s" in text, text
    # rank 1 sleeps 120 s: rank 0's all-reduce ended on the derived timeout, not by its peer
    assert "COLLECTIVE FAILED" in lines[-1], text
    assert "COLLECTIVE COMPLETED" not in text


def test_flight_recorders_read_on_demand_name_the_rank_that_never_entered(
    tmp_path: Path, launched: list[subprocess.Popen[str]]
) -> None:
    servers = Path(tmp_path / "srv")
    servers.mkdir()
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    process = start("spin", tmp_path, TRAINCTL_WORKER_SERVER_DIR=str(servers))
    launched.append(process)
    deadline = time.monotonic() + 90
    read_until(process, "READY", deadline, times=2)
    # rank 0 enters its sixth all-reduce; rank 1 spins
    while True:
        for rank in (0, 1):
            assert flight_recorder.fetch_rank(servers, rank, stacks) is None
        waiting = flight_recorder.read_rank(stacks, 0)
        spinning = flight_recorder.read_rank(stacks, 1)
        assert waiting is not None and spinning is not None
        if waiting.last_seq == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (waiting.last_seq, spinning.last_seq) == (6, 5)
    assert waiting.pending == "gloo:all_reduce #6 (scheduled)"
    hang = Hang(
        time=0.0,
        timeout_s=60.0,
        explanation="",
        ranks=(
            SilentRank(0, "node-0", 5, 10.0, "S", None, waiting.last_seq, waiting.pending),
            SilentRank(1, "node-1", 5, 10.0, "R", None, spinning.last_seq, spinning.pending),
        ),
    )
    node, why = localise_hang(hang)
    assert node == "node-1", why
    assert "never enqueued collective #6" in why


def test_no_debug_server_is_a_reason_not_an_error(tmp_path: Path) -> None:
    problem = flight_recorder.fetch_rank(tmp_path, 0, tmp_path)
    assert problem is not None and problem.startswith("flight recorder:")
    assert not list(tmp_path.glob("flight_recorder_rank_*"))
