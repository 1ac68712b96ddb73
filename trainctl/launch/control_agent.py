"""The agent's ends of the control channel: its TCP connection to the controller
(`ControlClient`) and the Unix datagram socket its workers report on (`WorkerChannel`).

The controller's end, the connection rules and the liveness scheme are in
`trainctl.launch.control`; the messages in `trainctl.protocol`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import sys
import threading
import time

from trainctl.health.liveness import Liveness, LivenessPolicy
from trainctl.launch.control import tune
from trainctl.protocol import (
    CONTROLLER_MESSAGES,
    Beat,
    Disconnected,
    Envelope,
    Message,
    ProtocolError,
    decode_datagram,
    decode_line,
    encode_line,
    unix_address,
)


class ControlClient:
    """An agent's end: `send` messages; the controller's arrive on `inbox` (EOF ->
    `Disconnected`; a bad line is dropped with a note on stderr, the agent's log)."""

    def __init__(
        self,
        endpoint: str,
        node: str,
        token: str,
        timeout_s: float = 30.0,
        liveness: LivenessPolicy | None = None,
    ) -> None:
        host, port = endpoint.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock = socket.create_connection((host, int(port)), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._sock.settimeout(None)
        self.local_host: str = self._sock.getsockname()[0]
        """This end's address: the interface the controller (and so the peers) reach."""
        self.policy = liveness or LivenessPolicy()
        tune(self._sock, self.policy)
        self.node = node
        self._token = token
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._liveness: Liveness[str] = Liveness(self.policy)
        self._liveness.watch("controller", time.monotonic())
        self._closed = threading.Event()
        threading.Thread(target=self._read_loop, name="control-read", daemon=True).start()
        self._last_sent = time.monotonic()
        threading.Thread(target=self._beat_loop, name="control-beat", daemon=True).start()

    def _beat_loop(self) -> None:
        """A `Beat` once an interval passed with nothing sent: any message counts as one."""
        interval = self.policy.interval_s
        while True:
            wait = interval - (time.monotonic() - self._last_sent)
            if wait > 0:
                if self._closed.wait(wait):
                    return
                continue
            if not self.send(Beat(), None) and self._closed.wait(interval):
                return

    def _read_loop(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                try:
                    message = decode_line(line, self._token, CONTROLLER_MESSAGES).message
                except ProtocolError as bad:
                    print(f"trainctl agent {self.node}: dropped a line: {bad}", file=sys.stderr)
                    continue
                if isinstance(message, Beat):
                    with self._lock:
                        self._liveness.heartbeat("controller", time.monotonic())
                else:
                    self.inbox.put(message)
        except OSError:
            pass
        self.inbox.put(Disconnected())

    def silent(self) -> str | None:
        """Why the controller counts as gone (its heartbeats stopped), or None."""
        with self._lock:
            suspected = self._liveness.check(time.monotonic())
        return suspected[0].reason if suspected else None

    def send(self, message: Message, attempt: int | None) -> bool:
        envelope = Envelope(message, self.node, attempt, time.time())
        try:
            with self._send_lock:
                self._sock.sendall(encode_line(envelope, self._token))
                self._last_sent = time.monotonic()
            return True
        except OSError:
            return False

    def close(self) -> None:
        self._closed.set()
        # shutdown first: the reader thread's file object keeps the descriptor open otherwise,
        # and the controller would never see the connection end.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


def worker_socket_address(job_id: str, attempt: int, node: str) -> str:
    """An abstract-namespace Unix socket name (no file, no 108-byte path limit).

    Written with a leading ``@`` (environment variables cannot hold NUL);
    `trainctl.protocol.unix_address` turns it into the kernel's form.
    """
    return f"@trainctl/{job_id}/{attempt}/{node}/{os.getpid()}"


class WorkerChannel:
    """The agent's receiving end of worker reports (Unix datagrams, never blocking workers).

    Datagrams without the node's worker token, or malformed, are dropped and counted.
    """

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(unix_address(address))
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[Message]:
        messages: list[Message] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:  # BlockingIOError: nothing more queued
                return messages
            try:
                messages.append(decode_datagram(data, self._token))
            except ProtocolError:
                self.dropped += 1

    def close(self) -> None:
        self._sock.close()
