"""What a node agent needs around torchrun: a warm one to fork, and the errors it leaves.

`TorchrunServer` is the node's `trainctl.launch.warmrun` process: it imports torch once and
forks each attempt's torchrun (`ForkedTorchrun`) from the argv and environment the agent hands
it on stdin (never its own environment), so no launch imports torch again.
`collect_error_files` reads the error.json files torchrun's ``@record`` (or trainctl.runtime's
hook) writes for a worker that died with an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from trainctl.launch import proctree
from trainctl.protocol import ErrorFile

TORCHRUN_MODULE = ("-m", "torch.distributed.run")


def collect_error_files(error_dir: str) -> tuple[ErrorFile, ...]:
    """The error.json files under `error_dir`, oldest first.

    Only workers that died with a Python exception write one; a SIGKILLed worker writes none.
    """
    errors: list[ErrorFile] = []
    for path in Path(error_dir).rglob("error.json"):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        message = raw.get("message", {}) if isinstance(raw, dict) else raw
        timestamp = 0.0
        if isinstance(message, dict):
            text = str(message.get("message", ""))
            extra = message.get("extraInfo", {})
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                timestamp = float(extra.get("timestamp", 0) or 0)
        else:
            text = str(message)
        errors.append(ErrorFile(str(path), text, timestamp, path.parent.name))
    return tuple(sorted(errors, key=lambda e: e.timestamp))


class TorchrunServer:
    """The node's `trainctl.launch.warmrun` process: torch imported once, every attempt's
    torchrun forked from it (`start`)."""

    READY_TIMEOUT_S = 60.0
    """How long a launch waits for a server still importing torch (a cold torchrun would
    import it again beside it) before it starts torchrun the cold way."""

    def __init__(self, python: str, env: dict[str, str], log: IO[bytes]) -> None:
        status_r, status_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [python, "-m", "trainctl.launch.warmrun", str(status_w)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(status_w,),
            )
        finally:
            os.close(status_w)
        self._status = status_r
        self._pending = b""
        self.ready = False
        self._started: list[int] = []
        self.codes: dict[int, int] = {}
        self.closed = False
        """The status pipe ended: the server is gone."""

    def alive(self) -> bool:
        return not self.closed and self.process.poll() is None

    def fileno(self) -> int:
        """The status pipe: readable when the server says something (a torchrun ended)."""
        return self._status

    def start(self, argv: list[str], env: dict[str, str], log_path: str) -> ForkedTorchrun | None:
        """Fork torchrun with `argv` (after ``-m torch.distributed.run``) and `env` on top of
        the server's environment, its output appended to `log_path`; None when the server
        cannot (gone, or not ready in `READY_TIMEOUT_S`): start torchrun the cold way then."""
        if not self._await(lambda: self.ready, self.READY_TIMEOUT_S) or not self.alive():
            return None
        request = json.dumps({"argv": argv, "env": env, "log": log_path}) + "\n"
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
        except OSError:
            return None
        if not self._await(lambda: bool(self._started), 10.0):
            return None
        return ForkedTorchrun(self._started.pop(0), self)

    def _await(self, said: Callable[[], bool], timeout_s: float) -> bool:
        """Read the server's status until `said()` holds, it is gone or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while not said() and self.alive() and time.monotonic() < deadline:
            self.drain(0.05)
        return said()

    def drain(self, timeout_s: float = 0.0) -> None:
        """Read what the server said (within `timeout_s`)."""
        if self.closed:
            return
        readable, _, _ = select.select([self._status], [], [], timeout_s)
        if not readable:
            return
        chunk = os.read(self._status, 1 << 16)
        if not chunk:
            self.closed = True
            return
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            word, *rest = line.decode().split()
            if word == "ready":
                self.ready = True
            elif word == "started":
                self._started.append(int(rest[0]))
            elif word == "exited":
                self.codes[int(rest[0])] = int(rest[1])

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self._status)
        self.closed = True


class ForkedTorchrun:
    """An attempt's torchrun forked by a `TorchrunServer`: what the agent uses of a
    `subprocess.Popen` (the server, its parent, reaps it and reports its status)."""

    def __init__(self, pid: int, server: TorchrunServer) -> None:
        self.pid = pid
        self.server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.drain()
            if self.pid in self.server.codes:
                self.returncode = self.server.codes.pop(self.pid)
            elif self.server.closed and not proctree.is_alive(self.pid):
                self.returncode = 1  # the server died first: its status is lost
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["torchrun"], timeout or 0.0)
            self.server.drain(0.05)
            if self.server.closed:
                time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def can_warm_start(argv: list[str]) -> bool:
    """Whether `argv` runs torchrun as a module, which a warm torchrun can take over."""
    return len(argv) > 3 and tuple(argv[1:3]) == TORCHRUN_MODULE
