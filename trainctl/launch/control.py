"""The control channel's transport: TCP lines between controller and agents, datagrams from
workers. What travels on it is defined, encoded and checked in `trainctl.protocol`.

One TCP connection per node (never one per worker: connection set-up, not traffic, is what
stops scaling). A connection must open with a `Hello` carrying the job's token; until it has,
any bad line closes it. Afterwards a bad line (malformed, unknown type, wrong token) is dropped
and reported on the queue as `Refused` (the first few per connection: a broken peer must not
flood the job's event log); nothing a peer sends can raise in the controller.

Liveness does not wait for a FIN (a dead host never sends one): each side sends a `Beat` every
`LivenessPolicy.interval_s` from a thread of its own and judges the other's beats with a
φ-accrual detector (`trainctl.health.liveness`); the controller asks `ControlServer.silent()`,
the agent `ControlClient.silent()` (`trainctl.launch.control_agent`, the agent's end). TCP
keepalive and a user timeout back them up, and every send has a timeout, so a peer that
stopped reading cannot block the sender.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

from trainctl.health.liveness import Liveness, LivenessPolicy, Silent
from trainctl.launch.inbox import Inbox, urgent
from trainctl.protocol import (
    AGENT_MESSAGES,
    Beat,
    Disconnected,
    Envelope,
    Hello,
    Message,
    ProtocolError,
    Refused,
    decode_line,
    decode_progress,
    encode_line,
)

REFUSALS_REPORTED = 5
"""Per connection, how many dropped lines are reported (the rest are only counted)."""
SEND_TIMEOUT_S = 2.0
"""A send that cannot complete within this (the peer stopped reading) fails."""
LISTEN_BACKLOG = 4096
"""Connections the kernel queues for the controller to accept (capped by net.core.somaxconn)."""
READ_ROUND_S = 0.005
"""The read loop takes what the connections sent at most once every this often, and hands
the round's messages over at once: at 1,024 nodes a line a wakeup (a thousand a second of
the selector, the GIL passing between threads and the controller's loop waking) became
several lines a wakeup. A message waits at most this much longer."""


def tune(sock: socket.socket, policy: LivenessPolicy) -> None:
    """Keepalive probes, a user timeout for unacknowledged data, a send timeout: the kernel's
    own checks behind the heartbeats (a dead peer that leaves data unacknowledged errors the
    connection even if nobody judges its beats)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, round(policy.acceptable_pause_s + policy.interval_s))
    for option, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", 1),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 1000 * (idle + 3)),
    ):
        if hasattr(socket, option):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    seconds = int(SEND_TIMEOUT_S)
    timeval = seconds.to_bytes(8, sys.byteorder) + int((SEND_TIMEOUT_S - seconds) * 1e6).to_bytes(
        8, sys.byteorder
    )
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


@dataclasses.dataclass
class _Peer:
    """One agent connection as the controller's read loop holds it."""

    conn: socket.socket
    address: str
    node: str | None = None
    """Set by its hello."""
    refused: int = 0
    pending: bytes = b""
    """The start of a line not yet complete."""


def _beat_prefix(node: str) -> bytes:
    """A controller beat's line up to its time (`encode_line`'s field order)."""
    return b'{"type":"beat","node":%s,"attempt":null,"time":' % json.dumps(node).encode()


def _is_beat(line: bytes, token: str, node: str) -> bool:
    """Whether an authenticated connection's line is a valid beat of its node (its token
    checked; anything else goes through `decode_line`)."""
    if b'"type":"beat"' not in line:
        return False
    try:
        fields = json.loads(line)
    except ValueError:
        return False
    return (
        isinstance(fields, dict)
        and fields.get("type") == "beat"
        and fields.get("token") == token
        and fields.get("node") == node
    )


def _beat_forever(interval_s: float, closed: threading.Event, beat: Callable[[], None]) -> None:
    while not closed.wait(interval_s):
        beat()


class ControlServer:
    """Accepts agent connections; delivers their messages on `messages` as `Envelope`s.

    A connection that closes after its hello delivers `Disconnected` for its node.
    """

    def __init__(
        self,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        liveness: LivenessPolicy | None = None,
        beat_interval_s: float | None = None,
    ) -> None:
        """`beat_interval_s`: how often the controller beats to its agents (default: the
        policy's interval; longer for big jobs, `controller_beat_interval`)."""
        self._token = token
        # Every agent of a 4,096-node job connects at once: a backlog of 128 (the default) drops
        # SYNs past it, and each dropped one costs its agent a 1 s retransmit.
        self._listener = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        self.host, self.port = self._listener.getsockname()[:2]
        self.messages: Inbox = Inbox()
        self._round: list[Envelope] = []
        """Messages of the read loop's current round (handed over at its end)."""
        self._connections: dict[str, socket.socket] = {}
        self._send_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.policy = liveness or LivenessPolicy()
        self._liveness: Liveness[str] = Liveness(self.policy)
        self.peers: dict[str, str] = {}
        """Node -> the address its agent connected from."""
        self._beat_prefix: dict[str, bytes] = {}
        self._selector = selectors.DefaultSelector()
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()
        threading.Thread(target=self._read_loop, name="control-read", daemon=True).start()
        threading.Thread(
            target=_beat_forever,
            args=(beat_interval_s or self.policy.interval_s, self._closed, self._beat_all),
            name="control-beat",
            daemon=True,
        ).start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The job's control token (for the agents' environment: never print or store it)."""
        return self._token

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            tune(conn, self.policy)
            self._selector.register(conn, selectors.EVENT_READ, _Peer(conn, f"{peer[0]}:{peer[1]}"))

    def _read_loop(self) -> None:
        """Every agent connection on one selector (a thread per connection woke 1,024 threads
        for 8,192 lines a second at 1,024 nodes: most of the controller's CPU)."""
        while not self._closed.is_set():
            started = time.monotonic()
            try:
                ready = self._selector.select(0.2)
            except (OSError, ValueError):
                return
            for key, _ in ready:
                self._readable(key.data)
            self._hand_over()
            rest = READ_ROUND_S - (time.monotonic() - started)
            if ready and rest > 0:
                time.sleep(rest)

    def _take(self, envelope: Envelope) -> None:
        """Add a message to the round; one that says a node failed is handed over at once,
        with what the round holds before it (a loss must not wait for a burst of progress
        being read behind it, and a node's messages keep their order)."""
        self._round.append(envelope)
        if urgent(envelope):
            self._hand_over()

    def _hand_over(self) -> None:
        self.messages.put_many(self._round)
        self._round = []

    def _readable(self, peer: _Peer) -> None:
        try:
            data = peer.conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed_conn(peer)
            return
        *lines, peer.pending = (peer.pending + data).split(b"\n")
        for line in lines:
            if not self._line(peer, line + b"\n"):
                self._closed_conn(peer)
                return

    def _refuse(self, node: str, peer: str, reason: str) -> None:
        self._take(Envelope(Refused(reason, peer), node, time=time.time()))

    def _line(self, peer: _Peer, line: bytes) -> bool:
        """Take one line of a connection; False when the connection must close."""
        node, conn = peer.node, peer.conn
        if node is not None and _is_beat(line, self._token, node):
            # Most of what 1,024 agents send: judged without building a message
            # (a full decode is 20 us; 4,096 beats a second at the default rate).
            with self._lock:
                if self._connections.get(node) is conn:
                    self._liveness.heartbeat(node, time.monotonic())
            return True
        # Progress, the rest of what agents send while training, in one pass when it can be.
        fast = decode_progress(line, self._token) if b'"type":"progress"' in line else None
        try:
            envelope = fast or decode_line(line, self._token, AGENT_MESSAGES)
        except ProtocolError as bad:
            peer.refused += 1
            if peer.refused <= REFUSALS_REPORTED:
                self._refuse(node or "?", peer.address, str(bad))
            return node is not None  # never authenticated: nothing more to hear from it
        if node is None:
            if not isinstance(envelope.message, Hello):
                self._refuse("?", peer.address, f"{envelope.message.TYPE} before hello")
                return False
            node = peer.node = envelope.node
            with self._lock:
                self._connections[node] = conn
                self._send_locks[node] = threading.Lock()
                self._liveness.watch(node, time.monotonic())
                self.peers[node] = peer.address
        elif envelope.node != node:
            envelope = Envelope(envelope.message, node, envelope.attempt, envelope.time)
        # Any message proves the agent alive: it sends a `Beat` only when it sent nothing
        # else for an interval (progress flows every step, so few beats while training runs).
        with self._lock:
            if self._connections.get(node) is conn:
                self._liveness.heartbeat(node, time.monotonic())
        if isinstance(envelope.message, Beat):
            return True
        self._take(envelope)
        return True

    def _closed_conn(self, peer: _Peer) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(peer.conn)
        node, conn = peer.node, peer.conn
        if node is not None:
            with self._lock:
                current = self._connections.get(node) is conn
                if current:
                    del self._connections[node]
                    self._liveness.forget(node)
            # Only the node's current connection ending says anything: an older one (its
            # agent replaced since) or one the controller dropped on purpose does not.
            if current:
                self._take(Envelope(Disconnected(), node, time=time.time()))
        with contextlib.suppress(OSError):
            conn.close()

    def send(self, node: str, message: Message) -> bool:
        """Send to one agent; False if it is not connected (or stopped reading)."""
        with self._lock:
            conn, lock = self._connections.get(node), self._send_locks.get(node)
        if conn is None or lock is None:
            return False
        try:
            with lock:
                conn.sendall(encode_line(Envelope(message, node, time=time.time()), self._token))
            return True
        except OSError:
            return False

    def _beat_all(self) -> None:
        with self._lock:
            conns = [(n, c, self._send_locks[n]) for n, c in self._connections.items()]
        # The same line `encode_line` makes, from a per-node prefix and one tail a round:
        # 1,024 a second at 1,024 nodes, where building each through the dataclass cost 12 us.
        tail = b'%r,"token":%s}\n' % (time.time(), json.dumps(self._token).encode())
        for node, conn, lock in conns:
            prefix = self._beat_prefix.get(node)
            if prefix is None:
                prefix = self._beat_prefix[node] = _beat_prefix(node)
            line = prefix + tail
            try:
                with lock:
                    conn.sendall(line)
            except OSError:
                pass

    def silent(self) -> list[Silent[str]]:
        """Connected agents whose heartbeats stopped (φ past the threshold); `last_heard` is
        wall-clock time."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            suspected = self._liveness.check(now)
        return [dataclasses.replace(s, last_heard=wall - (now - s.last_heard)) for s in suspected]

    def drop(self, node: str) -> None:
        """Close a node's connection (a silent node: nothing more it sends is heard)."""
        with self._lock:
            conn = self._connections.pop(node, None)
            self._liveness.forget(node)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._connections.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
