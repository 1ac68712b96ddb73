"""The control channel's transport: TCP lines between controller and agents, datagrams from
workers. What travels on it is defined, encoded and checked in `trainctl.protocol`.

One TCP connection per node (never one per worker: connection set-up, not traffic, is what
stops scaling). A connection must open with a `Hello` carrying the job's token; until it has,
any bad line closes it. Afterwards a bad line (malformed, unknown type, wrong token) is dropped
and reported on the queue as `Refused` (the first few per connection: a broken peer must not
flood the job's event log); nothing a peer sends can raise in the controller.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import sys
import threading
import time

from trainctl.protocol import (
    AGENT_MESSAGES,
    CONTROLLER_MESSAGES,
    Disconnected,
    Envelope,
    Hello,
    Message,
    ProtocolError,
    Refused,
    decode_datagram,
    decode_line,
    encode_line,
    unix_address,
)

REFUSALS_REPORTED = 5
"""Per connection, how many dropped lines are reported (the rest are only counted)."""


class ControlServer:
    """Accepts agent connections; delivers their messages on `messages` as `Envelope`s.

    A connection that closes after its hello delivers `Disconnected` for its node.
    """

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self._token = token
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self.messages: queue.Queue[Envelope] = queue.Queue()
        self._connections: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The job's control token (for the agents' environment: never print or store it)."""
        return self._token

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn, f"{peer[0]}:{peer[1]}"), daemon=True
            ).start()

    def _refuse(self, node: str, peer: str, reason: str) -> None:
        self.messages.put(Envelope(Refused(reason, peer), node, time=time.time()))

    def _serve(self, conn: socket.socket, peer: str) -> None:
        node: str | None = None
        refused = 0
        try:
            for line in conn.makefile("rb"):
                try:
                    envelope = decode_line(line, self._token, AGENT_MESSAGES)
                except ProtocolError as bad:
                    refused += 1
                    if refused <= REFUSALS_REPORTED:
                        self._refuse(node or "?", peer, str(bad))
                    if node is None:
                        return  # never authenticated: nothing more to hear from it
                    continue
                if node is None:
                    if not isinstance(envelope.message, Hello):
                        self._refuse("?", peer, f"{envelope.message.TYPE} before hello")
                        return
                    node = envelope.node
                    with self._lock:
                        self._connections[node] = conn
                elif envelope.node != node:
                    envelope = Envelope(envelope.message, node, envelope.attempt, envelope.time)
                self.messages.put(envelope)
        except OSError:
            pass
        finally:
            if node is not None:
                with self._lock:
                    if self._connections.get(node) is conn:
                        del self._connections[node]
                self.messages.put(Envelope(Disconnected(), node, time=time.time()))
            with contextlib.suppress(OSError):
                conn.close()

    def send(self, node: str, message: Message) -> bool:
        """Send to one agent; False if it is not connected."""
        with self._lock:
            conn = self._connections.get(node)
        if conn is None:
            return False
        try:
            conn.sendall(encode_line(Envelope(message, node, time=time.time()), self._token))
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
    """An agent's end: `send` messages; the controller's arrive on `inbox` (EOF ->
    `Disconnected`; a bad line is dropped with a note on stderr, the agent's log)."""

    def __init__(self, endpoint: str, node: str, token: str, timeout_s: float = 30.0) -> None:
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
        self._token = token
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read_loop, name="control-read", daemon=True).start()

    def _read_loop(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                try:
                    self.inbox.put(decode_line(line, self._token, CONTROLLER_MESSAGES).message)
                except ProtocolError as bad:
                    print(f"trainctl agent {self.node}: dropped a line: {bad}", file=sys.stderr)
        except OSError:
            pass
        self.inbox.put(Disconnected())

    def send(self, message: Message, attempt: int | None) -> bool:
        envelope = Envelope(message, self.node, attempt, time.time())
        try:
            with self._send_lock:
                self._sock.sendall(encode_line(envelope, self._token))
            return True
        except OSError:
            return False

    def close(self) -> None:
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
