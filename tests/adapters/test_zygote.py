"""Warm workers: the real zygote and shim processes, with a script that reports what it saw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainctl.launch import proctree
from trainctl.launch.zygote import worker_identity
from trainctl.protocol import Env

SCRIPT = """
import os, sys, time
print("argv", sys.argv[1:], "rank", os.environ.get("RANK"), "cwd", os.getcwd(), flush=True)
print("path0", sys.path[0], flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "raise":
    raise ValueError("boom")
if mode == "threads":
    import torch
    print("threads", torch.get_num_threads(), flush=True)
if mode == "wait":
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(60)
"""


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[str]:
    address = f"@trainctl-test/zygote/{os.getpid()}/{time.monotonic_ns()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainctl.launch.zygote", address],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    assert "zygote ready" in process.stderr.readline()
    try:
        yield address
    finally:
        process.kill()
        process.wait()


def shim(
    zygote: str | None, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    script = tmp_path / "work" / "script.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(SCRIPT)
    env = {**(os.environ if env is None else env), "RANK": "3", "LOCAL_RANK": "1"}
    if zygote is not None:
        env[Env.ZYGOTE] = zygote
    return subprocess.Popen(
        [sys.executable, "-m", "trainctl.launch.shim", str(script), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(60)
def test_worker_runs_with_the_shims_argv_env_cwd_and_stdio(zygote: str, tmp_path: Path) -> None:
    proc = shim(zygote, tmp_path, "exit", "7")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7
    assert "argv ['exit', '7'] rank 3 cwd " + str(tmp_path) in out
    assert f"path0 {tmp_path / 'work'}" in out  # the script's directory, as `python script.py`


@pytest.mark.timeout(120)
@pytest.mark.parametrize("omp", [None, "1"])
def test_worker_gets_the_torch_threads_a_cold_start_would(
    zygote: str, tmp_path: Path, omp: str | None
) -> None:
    # The zygote imports torch with one thread; a worker must not inherit that silently.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    cold, _ = shim(None, tmp_path, "threads", env=env).communicate(timeout=60)
    warm, _ = shim(zygote, tmp_path, "threads", env=env).communicate(timeout=60)
    assert "threads " in cold
    assert warm.splitlines()[-1] == cold.splitlines()[-1]


@pytest.mark.timeout(60)
def test_uncaught_exception_is_exit_1_with_traceback(zygote: str, tmp_path: Path) -> None:
    proc = shim(zygote, tmp_path, "raise")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "ValueError: boom" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["signal-forwarded", "shim-killed"])
def test_worker_dies_with_its_shim_or_its_signal(zygote: str, tmp_path: Path, how: str) -> None:
    pid_file = tmp_path / "pid"
    proc = shim(zygote, tmp_path, "wait", str(pid_file))
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert worker != proc.pid
    assert worker_identity(worker) == (3, 1)  # named tcw3.1: found without RANK in its env
    assert worker_identity(proc.pid) is None  # the shim is not the worker
    if how == "signal-forwarded":
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGTERM  # torchrun sees the worker's own death
    else:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while proctree.is_alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its shim"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_without_a_zygote_the_shim_starts_the_script_cold(tmp_path: Path) -> None:
    proc = shim("@trainctl-test/no-such-zygote", tmp_path, "exit", "5")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5
    assert "starting cold" in err and "argv ['exit', '5']" in out
