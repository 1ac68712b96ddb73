"""Worker -> node agent reports: progress heartbeats, results, events and stack dumps.

Unix datagrams to the agent's abstract socket (``TRAINCTL_AGENT_SOCKET``), typed and encoded by
`trainctl.protocol` with the node's worker token: a send never blocks the training loop, and
with no agent (a plain torchrun run) reports are silently dropped.

Each progress heartbeat carries the step's wall-clock `step_time` (since the previous
heartbeat) and, when the script marked it, its `busy_time`: the time spent inside
`Reporter.busy()` blocks since the previous heartbeat. Busy time is what straggler detection
needs: in synchronous training every rank's wall-clock step time equals the slowest rank's
(the fast ones wait in the collectives), while busy time — work that waits for no other rank,
such as loading and preparing the batch or local compute before the first collective — shows
which rank is slow.

When ``TRAINCTL_STACKS_DIR`` is set (the node agent sets it), SIGUSR2 makes the worker write
its Python stacks to ``<dir>/rank-<RANK>.txt`` (faulthandler): the agent's fallback when
py-spy cannot read the process. A stopped process runs no handler, so py-spy comes first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainctl.protocol import (
    STACK_DUMP_SIGNAL,
    Message,
    Result,
    WorkerEvent,
    WorkerProgress,
    encode_datagram,
    unix_address,
)
from trainctl.runtime.settings import WorkerSettings


class Reporter:
    def __init__(self, address: str | None, rank: int, token: str = "") -> None:
        self.rank = rank
        self._token = token
        self._address = unix_address(address) if address else None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self._last_step_time: float | None = None
        self._busy_s: float | None = None
        self._stacks_file: IO[str] | None = None

    @classmethod
    def from_settings(cls, settings: WorkerSettings, rank: int) -> Reporter:
        """A reporter to the worker's agent; registers stack dumps if the agent asks for them."""
        reporter = cls(settings.agent_socket, rank, settings.worker_token)
        if settings.stacks_dir:
            reporter.enable_stack_dumps(Path(settings.stacks_dir) / f"rank-{rank}.txt")
        return reporter

    @classmethod
    def from_env(cls, rank: int) -> Reporter:
        """`from_settings` with this process's environment."""
        return cls.from_settings(WorkerSettings.from_environ(os.environ), rank)

    def enable_stack_dumps(self, path: Path) -> None:
        """On SIGUSR2, write every thread's Python stack to `path` (appending)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stacks_file = open(path, "a")  # noqa: SIM115 - open for the process's lifetime
        faulthandler.register(STACK_DUMP_SIGNAL, file=self._stacks_file, all_threads=True)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count the time inside the block as this step's busy time (blocks may repeat)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._busy_s = (self._busy_s or 0.0) + time.perf_counter() - started

    def send(self, message: Message, reliable: bool = False) -> bool:
        """Send one message; `reliable` retries briefly rather than drop when the queue is full."""
        if self._sock is None or self._address is None:
            return False
        data = encode_datagram(message, self._token)
        deadline = time.monotonic() + (2.0 if reliable else 0.0)
        while True:
            try:
                self._sock.sendto(data, self._address)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
            except OSError:
                return False

    def progress(self, step: int) -> float | None:
        """Mark that `step` completed (the heartbeat hang detection and straggler stats use).

        Sends the wall-clock step time since the previous call and the busy time accumulated
        in `busy()` blocks since then (None when the step had none), then resets both.
        """
        now = time.time()
        step_time = None if self._last_step_time is None else now - self._last_step_time
        self._last_step_time = now
        busy_time, self._busy_s = self._busy_s, None
        self.send(WorkerProgress(self.rank, step, now, step_time, busy_time))
        return step_time

    def saving(self, step: int) -> None:
        """Mark that a checkpoint save of `step` starts: until the next step the controller
        allows the recipe's checkpoint allowance on top of the hang timeout (a save may wait
        for the previous upload). Step timers are left alone."""
        self.send(WorkerProgress(self.rank, step, time.time(), saving=True))

    def staged(self, step: int) -> None:
        """The save of `step` no longer blocks training (its upload goes on in the background):
        the allowance ends, or a hang right after a checkpoint would wait for it."""
        self.send(WorkerProgress(self.rank, step, time.time(), saving=False))

    def result(self, final_step: int, fingerprint: str) -> None:
        self.send(Result(self.rank, final_step, fingerprint), reliable=True)

    def event(self, kind: str, message: str, /, **data: Any) -> None:
        self.send(WorkerEvent(kind, message, self.rank, data), reliable=True)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._stacks_file is not None:
            faulthandler.unregister(STACK_DUMP_SIGNAL)
            self._stacks_file.close()
            self._stacks_file = None
