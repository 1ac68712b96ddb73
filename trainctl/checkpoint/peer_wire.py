"""The memory tier's peer transfer: one node's holder serves its tmpfs directory to the others.

A tiny request/response protocol over TCP, one connection per request (a replica transfer is a
handful of large files per step, so connection set-up is not what it costs). Each request is one
JSON line — ``{"token", "op", "path", "size", "checksum"}`` — then ``size`` raw bytes for a
``put``; each answer is one JSON line — ``{"ok", "error", "size"}`` — then ``size`` raw bytes for
a ``get``. Every request carries the job's control token (the agents' shared secret), compared in
constant time; a request without it is refused before anything is read or written. A worker
restoring from a peer holds only the read token derived from it (`read_token`, in a 0600
file its agent writes), which a holder accepts for ``get`` alone.

Operations, with paths relative to the holder's node directory (never absolute, never ``..``;
a peer writes only under ``held/``, what this holder keeps for others):

* ``put PATH`` + bytes + the sender's checksum: written to a temporary name, checked (CRC-32)
  and renamed into place; a mismatch is refused and nothing is kept (small files: layouts).
* ``put_slot PATH`` + a held slot's bytes + its record, entry spans and per-entry CRCs: the
  slot's record and checksums are removed first, the bytes received in place into the slot
  file (preallocated: no second copy of the state, ever), every entry's CRC checked against the
  sender's (those the sending holder computed, not a sum of what it read while sending: a slot
  the worker rewrote mid-send is refused), then the checksums and the record are written.
* ``get PATH`` (optionally ``offset``/``length``): the file's bytes by ``sendfile``.
* ``list PATH``: the relative names of every file under ``PATH`` (JSON, in ``size`` bytes).
* ``catalog PATH``: every JSON document under ``PATH`` (name -> parsed JSON), in one answer.
* ``checksum PATH`` + entry spans: the CRCs of those spans of the file, summed at the holder
  (a restore verifies a peer's copy without moving it).

`put_bytes` and `put_slot` pace themselves to `bandwidth` bytes/s so replication leaves the
network (and the durable tier's uploads) room; they run in the holder's background thread,
never in a worker.
"""

from __future__ import annotations

import hmac
import json
import mmap
import os
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from trainctl.checkpoint.checksum import format_checksum
from trainctl.checkpoint.slot_catalog import crc_text, entry_sum, read_json_tree, slot_crcs
from trainctl.checkpoint.slot_layout import SLOT_SUM, SlotRecord, write_json_atomic

CHUNK = 4 * 2**20
"""Bytes per socket write/read (and per pacing step)."""
WRITABLE = "held"
"""The only folder a peer may write into."""
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
            if not self.server.allows(str(request.get("token", "")), request.get("op")):
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
        if op in ("put", "put_slot") and relative.split("/", 1)[0] != WRITABLE:
            raise PeerError(f"path {relative!r}: a peer writes only under {WRITABLE}/")
        if op == "put":
            self._receive(path, int(request["size"]), str(request["checksum"]))
            self.server.on_put(relative)
            return {"ok": True}, b""
        if op == "put_slot":
            self._receive_slot(path, request)
            self.server.on_put(relative)
            return {"ok": True}, b""
        if op == "catalog":
            return {"ok": True}, json.dumps(read_json_tree(path)).encode()
        if op == "checksum":
            spans = [(int(offset), int(nbytes)) for offset, nbytes in request["entries"]]
            return {"ok": True}, json.dumps(slot_crcs(path, spans)).encode()
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

    def _receive_slot(self, path: str, request: dict[str, Any]) -> None:
        """Receive a held slot in place; its checksums and record only once every entry's CRC
        matched (`put_slot`)."""
        size = int(request["size"])
        spans = [(int(offset), int(nbytes)) for offset, nbytes in request["entries"]]
        expected = [str(crc) for crc in request["crcs"]]
        record = SlotRecord.from_json(request["record"])
        if record is None or len(expected) != len(spans):
            raise PeerError("put_slot: a record and one CRC per entry are required")
        if any(offset < 0 or offset + nbytes > size for offset, nbytes in spans):
            raise PeerError(f"put_slot: an entry lies outside the slot's {size} bytes")
        for stale in (f"{path}.json", f"{path}.crc.json"):  # the slot is not whole from now
            if os.path.exists(stale):
                os.unlink(stale)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+b") as file:
            if os.fstat(file.fileno()).st_size != size:
                file.truncate(size)
            got = self._receive_into(file, size, spans)
        bad = [i for i, (want, have) in enumerate(zip(expected, got, strict=True)) if want != have]
        if bad:
            raise PeerError(
                f"put_slot {os.path.basename(path)}: entry {bad[0]} (of {len(bad)} bad) fails "
                f"its CRC ({got[bad[0]]} != {expected[bad[0]]}): the record is not written"
            )
        sums = {**request["checksums"], "algorithm": SLOT_SUM, "crcs": expected}  # as summed here
        write_json_atomic(f"{path}.crc.json", sums)
        write_json_atomic(f"{path}.json", request["record"])

    def _receive_into(self, file: Any, size: int, spans: list[tuple[int, int]]) -> list[str]:
        """Read `size` bytes from the connection straight into the file's pages; the CRC of
        every span, each summed as soon as its last byte arrived (while the rest streams in)."""
        crcs = [crc_text(0)] * len(spans)
        if size == 0:
            return crcs
        # Spans by their end: a span is summed in place (incrementally, chunk by chunk) once
        # `done` passes its end.
        order = sorted(range(len(spans)), key=lambda i: spans[i][0] + spans[i][1])
        # MAP_POPULATE: the slot's pages mapped in one call, not one fault per 4 KiB page as the
        # socket's bytes land (6 MiB: ~2.6 ms of CPU faulting vs ~0.9 ms, every round).
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(file.fileno(), size, flags=flags) as mapped:
            view = memoryview(mapped)
            try:
                done, ready = 0, 0
                while done < size:
                    got = self.rfile.readinto(view[done : min(size, done + CHUNK)])
                    if not got:
                        raise PeerError(f"connection closed with {size - done} bytes to come")
                    done += got
                    while ready < len(order) and sum(spans[order[ready]]) <= done:
                        offset, nbytes = spans[order[ready]]
                        crcs[order[ready]] = entry_sum(view[offset : offset + nbytes])
                        ready += 1
                return crcs
            finally:
                view.release()


class PeerServer(socketserver.ThreadingTCPServer):
    """A holder's server for its node directory `root` (bind port 0: `endpoint` says where)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, root: str, token: str, host: str, on_put: Callable[[str], None] | None = None
    ) -> None:
        self.root = root
        self.token = token
        self.read_token = read_token(token)
        self.on_put: Callable[[str], None] = on_put or (lambda _path: None)
        super().__init__((host, 0), _Handler)
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long `close` waits for the loop to see it
            name="trainctl-peer-server",
            daemon=True,
        )

    def allows(self, token: str, op: Any) -> bool:
        """Whether `token` may make a request `op`: the job's token anything, the workers'
        read token (`read_token`) only ``get``."""
        if hmac.compare_digest(token, self.token):
            return True
        return op == "get" and hmac.compare_digest(token, self.read_token)

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
    endpoint: str,
    fields: dict[str, Any],
    token: str,
    send: Callable[[Any, socket.socket], None] | None = None,
    into: list[memoryview] | None = None,
) -> bytearray:
    """One request; the answer's body, read into the buffers `into` one after the other when
    given (then returned empty)."""
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            _write_line(stream, {**fields, "token": token})
            stream.flush()
            if send is not None:
                send(stream, sock)
                stream.flush()
            answer = _read_line(stream)
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
    except (OSError, ValueError) as error:
        raise PeerError(f"peer {endpoint}: {type(error).__name__}: {error}") from None
    if not answer.get("ok"):
        raise PeerError(f"peer {endpoint}: {answer.get('error')}")
    return body


def _paced(data: Any, bandwidth: float) -> Any:
    """A sender that writes `data` (a buffer) in CHUNKs, sleeping to stay under `bandwidth`."""

    def send(stream: Any, _sock: socket.socket) -> None:
        started = time.monotonic()
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            stream.write(view[offset : offset + CHUNK])
            ahead = (offset + CHUNK) / bandwidth - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    return send


def put_bytes(endpoint: str, token: str, path: str, data: bytes, bandwidth: float) -> None:
    """Write `data` to `path` on the peer at `endpoint`, paced to `bandwidth` bytes/s. Raises
    PeerError when the peer refused it (bad token, path or checksum) or is unreachable."""
    fields = {"op": "put", "path": path, "size": len(data), "checksum": checksum_bytes(data)}
    _request(endpoint, fields, token, _paced(data, bandwidth))


def put_slot(
    endpoint: str,
    token: str,
    path: str,
    source: str,
    record: dict[str, Any],
    entries: list[tuple[int, int]],
    crcs: list[str],
    bandwidth: float,
) -> None:
    """Send the slot file `source` into the held slot `path` at the peer (`put_slot`: in place,
    every entry checked against `crcs` before `record` is written), by ``sendfile`` paced to
    `bandwidth` bytes/s. Raises PeerError when the peer refused it (a CRC differs: the slot
    changed while it was sent) or is unreachable."""
    size = os.path.getsize(source)
    fields = {
        "op": "put_slot",
        "path": path,
        "size": size,
        "entries": [list(span) for span in entries],
        "crcs": list(crcs),
        "record": record,
        "checksums": {"step": record["step"], "layout": record["layout"]},
    }

    def send(stream: Any, sock: socket.socket) -> None:
        started = time.monotonic()
        with open(source, "rb") as file:
            for offset in range(0, size, CHUNK):
                count = min(CHUNK, size - offset)
                if sock.sendfile(file, offset, count) != count:
                    raise PeerError(f"{source} shrank while it was sent")
                ahead = (offset + count) / bandwidth - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    _request(endpoint, fields, token, send)


def catalog(endpoint: str, token: str, path: str) -> dict[str, Any]:
    """Every JSON document under `path` at the peer (relative name -> parsed JSON)."""
    value = json.loads(_request(endpoint, {"op": "catalog", "path": path}, token))
    if not isinstance(value, dict):
        raise PeerError(f"peer {endpoint}: catalog of {path} is not a JSON object")
    return value


def remote_crcs(endpoint: str, token: str, path: str, entries: list[tuple[int, int]]) -> list[str]:
    """The CRCs of `entries` (offset, nbytes) of `path` at the peer, summed there."""
    fields = {"op": "checksum", "path": path, "entries": [list(span) for span in entries]}
    return [str(crc) for crc in json.loads(_request(endpoint, fields, token))]


def fetch_file(endpoint: str, token: str, path: str) -> bytearray:
    """The bytes of `path` on the peer at `endpoint` (unverified: the caller checks them)."""
    return _request(endpoint, {"op": "get", "path": path}, token)


def fetch_range(endpoint: str, token: str, path: str, offset: int, length: int) -> bytearray:
    """`length` bytes of `path` from `offset` on the peer at `endpoint` (unverified)."""
    return _request(
        endpoint, {"op": "get", "path": path, "offset": offset, "length": length}, token
    )


def fetch_range_into(
    endpoint: str, token: str, path: str, offset: int, into: memoryview | list[memoryview]
) -> None:
    """Read the bytes of `path` from `offset` at the peer straight into `into` (a tensor's
    memory, say: no intermediate buffer), or into each buffer of a list in turn (one request
    for consecutive pieces that land in different places); unverified."""
    views = [into] if isinstance(into, memoryview) else list(into)
    length = sum(view.nbytes for view in views)
    fields = {"op": "get", "path": path, "offset": offset, "length": length}
    _request(endpoint, fields, token, into=views)


def read_token(token: str) -> str:
    """The token a worker reads peers' slots with (``get`` only), derived from the job's
    `token`: the workers never hold the job's token (the agent hands them this one in a
    0600 file, `Env.PEER_TOKEN_FILE`)."""
    return hmac.new(token.encode(), b"trainctl-peer-read", "sha256").hexdigest()


def list_files(endpoint: str, token: str, path: str) -> list[str]:
    """Every file under `path` on the peer (relative to `path`); [] when there is none."""
    names = json.loads(_request(endpoint, {"op": "list", "path": path}, token))
    return [str(name) for name in names]


def checksum_bytes(data: bytes | memoryview) -> str:
    """The CRC-32 of `data` in manifest form."""
    return format_checksum(zlib.crc32(data))
