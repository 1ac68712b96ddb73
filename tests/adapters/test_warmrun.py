"""The node's torchrun server: a real `trainctl.launch.warmrun` process forking real torchruns
(standalone, one worker running a script that reports what it saw)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainctl.launch import proctree
from trainctl.launch.torchrun import ForkedTorchrun, TorchrunServer

SCRIPT = """
import os, sys, time
print("seen", os.environ.get("TEST_VALUE"), os.environ.get("RANK"), flush=True)
if sys.argv[1] == "wait":
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(120)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TorchrunServer]:
    log = (tmp_path / "server.log").open("ab", buffering=0)
    env = {k: v for k, v in os.environ.items() if k != "TEST_VALUE"}
    started = TorchrunServer(sys.executable, env, log)
    try:
        yield started
    finally:
        pid = started.process.pid
        left = proctree.descendants(pid)
        started.discard()
        proctree.kill_tree(left, 1.0)
        log.close()
        assert not [p for p in left if proctree.is_alive(p)]


def torchrun_argv(tmp_path: Path, *args: str) -> list[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return ["--standalone", "--nproc-per-node=1", str(script), *args]


def wait_for(predicate, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_waiting(server: TorchrunServer, tmp_path: Path) -> tuple[ForkedTorchrun, Path]:
    """A forked torchrun whose worker has started and waits (its pid in the returned file)."""
    pid_file = tmp_path / "worker.pid"
    running = server.start(
        torchrun_argv(tmp_path, "wait", str(pid_file)), {}, str(tmp_path / "node.log")
    )
    assert running is not None
    wait_for(pid_file.exists)
    return running, pid_file


@pytest.mark.timeout(180)
def test_each_attempt_is_a_fork_with_its_own_environment_and_exit_status(
    server: TorchrunServer, tmp_path: Path
) -> None:
    log = tmp_path / "node.log"
    first = server.start(torchrun_argv(tmp_path, "3"), {"TEST_VALUE": "one"}, str(log))
    assert first is not None
    assert first.wait(timeout=120) == 1  # torchrun's status for a failed worker
    second = server.start(torchrun_argv(tmp_path, "0"), {}, str(log))
    assert second is not None and second.pid != first.pid
    assert second.wait(timeout=120) == 0
    text = log.read_text()
    # The first attempt's environment reached its worker and did not stay in the server.
    assert "seen one 0" in text
    assert "exitcode  : 3" in text  # torchrun's failure summary names the worker's status
    assert "seen None 0" in text
    assert server.alive()


@pytest.mark.timeout(180)
def test_a_killed_torchrun_reports_the_signal_and_the_server_serves_on(
    server: TorchrunServer, tmp_path: Path
) -> None:
    running, pid_file = start_waiting(server, tmp_path)
    assert running.poll() is None
    worker = int(pid_file.read_text())
    assert worker in proctree.descendants(running.pid)
    running.send_signal(signal.SIGKILL)
    assert running.wait(timeout=60) == -signal.SIGKILL
    proctree.kill_tree([worker], 1.0)
    again = server.start(torchrun_argv(tmp_path, "0"), {}, str(tmp_path / "node.log"))
    assert again is not None and again.wait(timeout=120) == 0


@pytest.mark.timeout(180)
def test_a_dead_server_makes_the_agent_start_torchrun_the_cold_way(
    server: TorchrunServer, tmp_path: Path
) -> None:
    running, pid_file = start_waiting(server, tmp_path)
    server.process.kill()
    server.process.wait()
    assert server.start(torchrun_argv(tmp_path, "0"), {}, str(tmp_path / "node.log")) is None
    assert not server.alive()
    # Its torchrun lives on (the agent's teardown ends it); once it is gone its status reads
    # as a failure, never as success.
    proctree.kill_tree([running.pid, int(pid_file.read_text())], 1.0)
    assert running.wait(timeout=60) == 1
