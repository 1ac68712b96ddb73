"""The memory tier's peer transfer: one node's holder serves its tmpfs directory to the others.

A tiny request/response protocol over TCP, one connection per request (a replica transfer is a
handful of large files per step, so connection set-up is not what it costs). Each request is one
JSON line — ``{"token", "op", "path", "size", "checksum"}`` — then ``size`` raw bytes for a
``put``; each answer is one JSON line — ``{"ok", "error", "size"}`` — then ``size`` raw bytes for
a ``get``. Every request carries the job's control token (the agents' shared secret), compared in
constant time; a request without it is refused before anything is read or written.

Operations, with paths relative to the holder's node directory (never absolute, never ``..``):

* ``put PATH`` + bytes + the sender's checksum: written to a temporary name, checked (CRC-32,
  the manifest's algorithm) and renamed into place; a mismatch is refused and nothing is kept.
* ``get PATH``: the file's bytes (the reader verifies them against the manifest).
* ``list PATH``: the relative names of every file under ``PATH`` (JSON, in ``size`` bytes).

`put_bytes` paces itself to `bandwidth` bytes/s so replication leaves the network (and the
durable tier's uploads) room; it runs in the holder's background thread, never in a worker.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from trainctl.checkpoint.checksum import format_checksum

CHUNK = 4 * 2**20
"""Bytes per socket write/read (and per pacing step)."""
TIMEOUT_S = 10.0
"""Connect and per-read timeout: a dead peer host sends no FIN."""


class PeerError(OSError):
    """A peer refused a request or could not be reached."""


def safe_join(root: str, relative: str) -> str:
    """`relative` under `root`; raises PeerError for an absolute path or one leaving `root`."""
    if not relative or os.path.isabs(relative):
        raise PeerError(f"bad path {relative!r}")
    path = os.path.normpath(os.path.join(root, relative))
    if path != os.path.normpath(root) and not path.startswith(os.path.normpath(root) + os.sep):
        raise PeerError(f"path {relative!r} leaves the holder's directory")
    return path


def _read_line(stream: Any) -> dict[str, Any]:
    line = stream.readline(64 * 1024)
    if not line.endswith(b"\n"):
        raise PeerError("connection closed before a full header")
    fields = json.loads(line)
    if not isinstance(fields, dict):
        raise PeerError("header is not a JSON object")
    return fields


def _write_line(stream: Any, fields: dict[str, Any]) -> None:
    stream.write(json.dumps(fields, separators=(",", ":")).encode() + b"\n")


class _Handler(socketserver.StreamRequestHandler):
    server: PeerServer

    def handle(self) -> None:
        self.connection.settimeout(TIMEOUT_S)
        try:
            request = _read_line(self.rfile)
            if not hmac.compare_digest(str(request.get("token", "")), self.server.token):
                raise PeerError("missing or wrong token")
            if request.get("op") == "get":  # the file straight from the page cache
                path = safe_join(self.server.root, str(request.get("path", "")))
                self._send_file(path, request.get("offset"), request.get("length"))
                return
            answer, body = self._serve(request)
        except (OSError, ValueError) as error:
            answer, body = {"ok": False, "error": f"{type(error).__name__}: {error}"}, b""
        _write_line(self.wfile, {**answer, "size": len(body)})
        self.wfile.write(body)

    def _send_file(self, path: str, offset: Any = None, length: Any = None) -> None:
        """Answer a get (of the whole file, or of `length` bytes from `offset`) with
        `socket.sendfile`: the kernel copies the tmpfs pages to the socket, no Python buffer
        holds the object."""
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            start = int(offset or 0)
            count = size - start if length is None else int(length)
            if start < 0 or count < 0 or start + count > size:
                raise PeerError(f"range {start}+{count} outside {size} bytes")
            _write_line(self.wfile, {"ok": True, "size": count})
            self.wfile.flush()
            self.connection.sendfile(file, start, count)

    def _serve(self, request: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        op, relative = request.get("op"), str(request.get("path", ""))
        path = safe_join(self.server.root, relative)
        if op == "put":
            self._receive(path, int(request["size"]), str(request["checksum"]))
            self.server.on_put(relative)
            return {"ok": True}, b""
        if op == "list":
            names = []
            for folder, _dirs, files in os.walk(path):
                names += [os.path.relpath(os.path.join(folder, f), path) for f in files]
            return {"ok": True}, json.dumps(sorted(names)).encode()
        raise PeerError(f"unknown op {op!r}")

    def _receive(self, path: str, size: int, checksum: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.part-{threading.get_ident()}"
        crc, left = 0, size
        try:
            with open(temporary, "wb") as file:
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        raise PeerError(f"connection closed with {left} bytes to come")
                    crc = zlib.crc32(chunk, crc)
                    file.write(chunk)
                    left -= len(chunk)
            if format_checksum(crc) != checksum:
                raise PeerError(f"checksum {format_checksum(crc)} != {checksum}: not kept")
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


class PeerServer(socketserver.ThreadingTCPServer):
    """A holder's server for its node directory `root` (bind port 0: `endpoint` says where)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, root: str, token: str, host: str, on_put: Callable[[str], None] | None = None
    ) -> None:
        self.root = root
        self.token = token
        self.on_put: Callable[[str], None] = on_put or (lambda _path: None)
        super().__init__((host, 0), _Handler)
        self._thread = threading.Thread(
            target=self.serve_forever, name="trainctl-peer-server", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> PeerServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def _request(
    endpoint: str, fields: dict[str, Any], token: str, send: Callable[[Any], None] | None = None
) -> bytearray:
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            _write_line(stream, {**fields, "token": token})
            if send is not None:
                send(stream)
            stream.flush()
            answer = _read_line(stream)
            body = bytearray(int(answer.get("size", 0)))  # read into once, not re-joined
            got = stream.readinto(body)
            if got != len(body):
                raise PeerError(f"connection closed after {got} of {len(body)} bytes")
    except (OSError, ValueError) as error:
        raise PeerError(f"peer {endpoint}: {type(error).__name__}: {error}") from None
    if not answer.get("ok"):
        raise PeerError(f"peer {endpoint}: {answer.get('error')}")
    return body


def put_bytes(endpoint: str, token: str, path: str, data: bytes, bandwidth: float) -> None:
    """Write `data` to `path` on the peer at `endpoint`, paced to `bandwidth` bytes/s. Raises
    PeerError when the peer refused it (bad token, path or checksum) or is unreachable."""
    fields = {"op": "put", "path": path, "size": len(data), "checksum": checksum_bytes(data)}

    def stream_paced(stream: Any) -> None:
        started = time.monotonic()
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            stream.write(view[offset : offset + CHUNK])
            ahead = (offset + CHUNK) / bandwidth - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    _request(endpoint, fields, token, stream_paced)


def fetch_file(endpoint: str, token: str, path: str) -> bytearray:
    """The bytes of `path` on the peer at `endpoint` (unverified: the caller checks them)."""
    return _request(endpoint, {"op": "get", "path": path}, token)


def fetch_range(endpoint: str, token: str, path: str, offset: int, length: int) -> bytearray:
    """`length` bytes of `path` from `offset` on the peer at `endpoint` (unverified)."""
    return _request(
        endpoint, {"op": "get", "path": path, "offset": offset, "length": length}, token
    )


def list_files(endpoint: str, token: str, path: str) -> list[str]:
    """Every file under `path` on the peer (relative to `path`); [] when there is none."""
    names = json.loads(_request(endpoint, {"op": "list", "path": path}, token))
    return [str(name) for name in names]


def checksum_bytes(data: bytes | memoryview) -> str:
    """The CRC-32 of `data` in manifest form."""
    return format_checksum(zlib.crc32(data))
