"""Worker -> node agent reports: progress heartbeats, results and events.

Unix datagrams to the agent's abstract socket (``TRAINCTL_AGENT_SOCKET``): a send never blocks
the training loop, and with no agent (a plain torchrun run) reports are silently dropped.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from trainctl.launch.control import unix_address


class Reporter:
    def __init__(self, address: str | None, rank: int) -> None:
        self.rank = rank
        self._address = unix_address(address) if address else None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self._last_step_time: float | None = None

    @classmethod
    def from_env(cls, rank: int) -> Reporter:
        return cls(os.environ.get("TRAINCTL_AGENT_SOCKET"), rank)

    def send(self, message: dict[str, Any], reliable: bool = False) -> bool:
        """Send one message; `reliable` retries briefly rather than drop when the queue is full."""
        if self._sock is None or self._address is None:
            return False
        data = json.dumps(message, separators=(",", ":"), default=str).encode()
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

    def progress(self, step: int) -> None:
        """Mark that `step` completed (the heartbeat hang detection and straggler stats use)."""
        now = time.time()
        step_time = None if self._last_step_time is None else now - self._last_step_time
        self._last_step_time = now
        self.send(
            {
                "type": "progress",
                "rank": self.rank,
                "step": step,
                "time": now,
                "step_time": step_time,
            }
        )

    def result(self, final_step: int, fingerprint: str) -> None:
        self.send(
            {
                "type": "result",
                "rank": self.rank,
                "final_step": final_step,
                "fingerprint": fingerprint,
            },
            reliable=True,
        )

    def event(self, kind: str, message: str, /, **data: Any) -> None:
        self.send(
            {"type": "event", "rank": self.rank, "kind": kind, "message": message, "data": data},
            reliable=True,
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
