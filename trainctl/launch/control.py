"""The control channel between the controller and its node agents.

One TCP connection per node (never one per worker: connection set-up, not traffic, is what
stops scaling), carrying JSON objects one per line. Agents gather their own workers' heartbeats
locally (`WorkerChannel`, a Unix datagram socket) and forward them in batches.

Messages agent -> controller: ``hello``, ``verdict`` (a health gate or probe record),
``started``, ``progress`` (per-rank step, step time and busy time), ``result`` (final step and
fingerprint), ``event`` (a worker's event, e.g. a checkpoint commit), ``stacks`` (dumps answering
``dump_stacks``), ``exit``. Controller -> agent: ``stop``, ``dump_stacks``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from typing import Any

Message = dict[str, Any]


def _encode(message: Message) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


class ControlServer:
    """Accepts agent connections; delivers their messages on a queue as (node, message).

    A connection that closes delivers ``{"type": "disconnected"}`` for its node.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self.messages: queue.Queue[tuple[str, Message]] = queue.Queue()
        self._connections: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        node = "?"
        try:
            for line in conn.makefile("rb"):
                message = json.loads(line)
                if message.get("type") == "hello":
                    node = str(message["node"])
                    with self._lock:
                        self._connections[node] = conn
                self.messages.put((node, message))
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                if self._connections.get(node) is conn:
                    del self._connections[node]
            self.messages.put((node, {"type": "disconnected"}))
            with contextlib.suppress(OSError):
                conn.close()

    def send(self, node: str, message: Message) -> bool:
        """Send to one agent; False if it is not connected."""
        with self._lock:
            conn = self._connections.get(node)
        if conn is None:
            return False
        try:
            conn.sendall(_encode(message))
            return True
        except OSError:
            return False

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._connections.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()


class ControlClient:
    """An agent's end: send messages; incoming ones arrive on `inbox` (EOF -> ``disconnected``)."""

    def __init__(self, endpoint: str, node: str, timeout_s: float = 30.0) -> None:
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
        self.node = node
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read_loop, name="control-read", daemon=True).start()

    def _read_loop(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                self.inbox.put(json.loads(line))
        except (OSError, ValueError):
            pass
        self.inbox.put({"type": "disconnected"})

    def send(self, message: Message) -> bool:
        try:
            with self._send_lock:
                self._sock.sendall(_encode(message))
            return True
        except OSError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def worker_socket_address(job_id: str, attempt: int, node: str) -> str:
    """An abstract-namespace Unix socket name (no file, no 108-byte path limit).

    Written with a leading ``@`` (environment variables cannot hold NUL); `unix_address`
    turns it into the kernel's form.
    """
    return f"@trainctl/{job_id}/{attempt}/{node}/{os.getpid()}"


def unix_address(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


class WorkerChannel:
    """The agent's receiving end of worker heartbeats (Unix datagrams, never blocking workers)."""

    def __init__(self, address: str) -> None:
        self.address = address
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
            except BlockingIOError:
                return messages
            except OSError:
                return messages
            with contextlib.suppress(ValueError):
                messages.append(json.loads(data))

    def close(self) -> None:
        self._sock.close()
