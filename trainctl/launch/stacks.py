"""Dumping the Python stacks of a node's workers when the controller suspects a hang.

A hung worker may be stopped (SIGSTOP, a debugger) and then runs no signal handler, so the
first tool is py-spy, which reads the process's memory from outside:

- a stopped process (state ``T``/``t``): ``py-spy dump --nonblocking`` (blocking mode tries to
  suspend the process with ptrace, which fails on one that is already stopped);
- otherwise ``py-spy dump`` (a consistent snapshot), then ``--nonblocking``;
- where py-spy is missing or may not read the process (no ptrace permission): SIGUSR2, on
  which `trainctl.runtime` makes the worker write its stacks with faulthandler into
  ``<stacks dir>/rank-<RANK>.txt``.

Each dump records the method that produced it and the errors of the methods that failed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainctl.health import flight_recorder
from trainctl.launch import proctree
from trainctl.protocol import STACK_DUMP_SIGNAL, StackDump

PY_SPY_TIMEOUT_S = 10.0
FAULTHANDLER_WAIT_S = 2.0


@dataclasses.dataclass(frozen=True)
class WorkerProcess:
    pid: int
    rank: int
    local_rank: int


def process_state(pid: int) -> str | None:
    """The /proc state letter of `pid` (R, S, D, T, t, Z...), None if it is gone."""
    info = proctree.stat(pid)
    return None if info is None else info[1]


def find_workers(root: int) -> list[WorkerProcess]:
    """torchrun's worker processes below `root` (`zygote.worker_identity`: RANK in the
    environment, or a warm worker's name), skipping a worker's own children (data loaders
    inherit its identity)."""
    from trainctl.launch.zygote import worker_identity

    ranked = {}
    for pid in proctree.descendants(root):
        identity = worker_identity(pid)
        if identity is not None:
            ranked[pid] = identity
    workers = [
        WorkerProcess(pid, rank, local_rank)
        for pid, (rank, local_rank) in ranked.items()
        if (proctree.stat(pid) or (None, ""))[0] not in ranked
    ]
    return sorted(workers, key=lambda w: w.rank)


def py_spy_binary() -> str | None:
    """py-spy beside the running interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _py_spy(binary: str, pid: int, nonblocking: bool) -> tuple[str | None, str | None]:
    command = [binary, "dump", "--pid", str(pid)] + (["--nonblocking"] if nonblocking else [])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {PY_SPY_TIMEOUT_S:g} s"
    except OSError as error:
        return None, str(error)
    if done.returncode == 0 and "Thread" in done.stdout:
        return done.stdout, None
    first_error = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
    return None, f"exit {done.returncode}: {first_error}"


def dump_with_faulthandler(pid: int, path: Path) -> tuple[str | None, str | None]:
    """SIGUSR2 `pid` and read what it appends to `path`: (text, None) or (None, why not).

    Works only for a worker whose runtime registered the dump (`Reporter.from_env` with
    ``TRAINCTL_STACKS_DIR`` set) and that is not stopped.
    """
    offset = path.stat().st_size if path.exists() else 0
    try:
        os.kill(pid, STACK_DUMP_SIGNAL)
    except OSError as error:
        return None, str(error)
    deadline = time.monotonic() + FAULTHANDLER_WAIT_S
    last_size = offset
    while time.monotonic() < deadline:
        time.sleep(0.1)
        size = path.stat().st_size if path.exists() else 0
        if size > offset and size == last_size:  # written and no longer growing
            with open(path, encoding="utf-8", errors="replace") as handle:
                handle.seek(offset)
                return handle.read(), None
        last_size = size
    return None, f"no dump in {path} within {FAULTHANDLER_WAIT_S:g} s (process stopped?)"


def dump_worker(
    worker: WorkerProcess, stacks_dir: Path, server_dir: str | None = None
) -> StackDump:
    """Dump one worker's stacks: its state, the text, the method that worked, the failures;
    first its flight recorder, from its debug server in `server_dir` (fast, and taken before
    py-spy pauses the process)."""
    state = process_state(worker.pid)
    failures: list[str] = []
    if server_dir is not None and state not in ("T", "t", None):
        stacks_dir.mkdir(parents=True, exist_ok=True)
        problem = flight_recorder.fetch_rank(server_dir, worker.rank, stacks_dir)
        if problem is not None:
            failures.append(problem)
    text: str | None = None
    method: str | None = None
    binary = py_spy_binary()
    attempts: list[tuple[str, bool]] = []
    if binary is None:
        failures.append("py-spy: not installed")
    elif state in ("T", "t"):
        attempts = [("py-spy --nonblocking", True)]
    else:
        attempts = [("py-spy", False), ("py-spy --nonblocking", True)]
    for name, nonblocking in attempts:
        assert binary is not None
        text, error = _py_spy(binary, worker.pid, nonblocking)
        if text is not None:
            method = name
            break
        failures.append(f"{name}: {error}")
    if text is None:
        text, error = dump_with_faulthandler(worker.pid, stacks_dir / f"rank-{worker.rank}.txt")
        if text is not None:
            method = "faulthandler (SIGUSR2)"
        else:
            failures.append(f"faulthandler: {error}")
    collectives = flight_recorder.read_rank(stacks_dir, worker.rank)
    return StackDump(
        rank=worker.rank,
        local_rank=worker.local_rank,
        pid=worker.pid,
        state=state,
        method=method,
        text=text,
        failures=tuple(failures),
        nccl_seq=collectives.last_seq if collectives else None,
        nccl_pending=collectives.pending if collectives else None,
        flight_recorder=flight_recorder.trimmed(stacks_dir, worker.rank),
    )
