"""The framing every memory-tier peer request shares (`trainctl.checkpoint.peer_wire` serves the
requests, `trainctl.checkpoint.slot_wire` moves held slots): one JSON line per header or answer,
raw bytes after it where a header says so, and the errors both sides raise."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

CHUNK = 4 * 2**20
"""Bytes per socket write/read (and per pacing step)."""
TIMEOUT_S = 10.0
"""Connect and per-read timeout: a dead peer host sends no FIN."""


class PeerError(OSError):
    """A peer refused a request or could not be reached."""


def read_line(stream: Any) -> dict[str, Any]:
    """One header or answer (a JSON object on one line) from `stream`."""
    line = stream.readline(64 * 1024)
    if not line.endswith(b"\n"):
        raise PeerError("connection closed before a full header")
    fields = json.loads(line)
    if not isinstance(fields, dict):
        raise PeerError("header is not a JSON object")
    return fields


def write_line(stream: Any, fields: dict[str, Any]) -> None:
    stream.write(json.dumps(fields, separators=(",", ":")).encode() + b"\n")


@contextlib.contextmanager
def connection(endpoint: str, fields: dict[str, Any], token: str) -> Iterator[tuple[Any, Any]]:
    """A connection to the peer at `endpoint` (host:port) that has sent the request header
    `fields` with `token`: (the socket, a buffered stream over it). OSError and ValueError
    inside come out as PeerError naming the peer."""
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            write_line(stream, {**fields, "token": token})
            stream.flush()
            yield sock, stream
    except (OSError, ValueError) as error:
        raise PeerError(f"peer {endpoint}: {type(error).__name__}: {error}") from None


def request(
    endpoint: str,
    fields: dict[str, Any],
    token: str,
    send: Callable[[Any, socket.socket], None] | None = None,
    into: list[memoryview] | None = None,
) -> bytearray:
    """One request; the answer's body, read into the buffers `into` one after the other when
    given (then returned empty)."""
    with connection(endpoint, fields, token) as (sock, stream):
        if send is not None:
            send(stream, sock)
            stream.flush()
        answer = read_line(stream)
        size = int(answer.get("size", 0))
        wanted = sum(view.nbytes for view in into) if into is not None else size
        if into is not None and answer.get("ok") and size != wanted:
            raise PeerError(f"answered {size} bytes where {wanted} were asked")
        body = bytearray(size) if into is None or not answer.get("ok") else bytearray()
        targets = [memoryview(body)] if into is None or not answer.get("ok") else into
        for target in targets:
            got = stream.readinto(target)
            if got != target.nbytes:
                raise PeerError(f"connection closed after {got} of {target.nbytes} bytes")
    if not answer.get("ok"):
        raise PeerError(f"peer {endpoint}: {answer.get('error')}")
    return body
