"""Moving a held slot to a peer's holder (`trainctl.checkpoint.peer_wire` serves the requests).

Two versions of the request, told apart by their op (a holder answers an op it does not know
with ``unknown op``, before any byte of the slot is sent):

* ``put_slot_v2`` (this release): the sender's CRCs are the ones kept, nobody sums twice. The
  sender sends the header (record, per-entry CRCs, size); the receiver removes the held slot's
  record and checksums (the slot is not whole from now) and answers ``ready``; the sender
  sends the slot's bytes by ``sendfile``; the receiver reads every byte into the slot file (in
  place, over a mapping kept from one put to the next: `HeldMaps`) and answers ``received``;
  only then does the sender look at its own slot's record again and send ``commit`` when it
  is unchanged (the worker removes a slot's record before it writes the slot, so the bytes the
  peer read are the ones the CRCs were taken of: ``sendfile`` returning says only that the
  kernel took the pages, which a worker may rewrite until the peer has read them), else
  ``abort``; the receiver writes the checksums, then the record, only on ``commit``. A
  connection cut at any point before leaves the held slot without a record (never read). A
  copy whose bytes differ from its CRCs all the same (memory corruption) is caught where every
  copy is verified before use: the restore (`trainctl.checkpoint.slot_assemble`).
* ``put_slot`` (version 1, kept for a peer of the previous release, either way): header with
  the entry spans and CRCs, then the bytes at once; the receiver sums every entry and keeps
  the record only when all match. A sender falls back to it for a peer that answered
  ``put_slot_v2`` with ``unknown op`` (and remembers that peer: `_V1_PEERS`).

`put_slot` sends either (`protocol`); `receive_slot` and `receive_slot_v1` serve them.
"""

from __future__ import annotations

import mmap
import os
import re
import socket
import threading
import time
from typing import Any

from trainctl.checkpoint.peer_frame import (
    CHUNK,
    PeerError,
    connection,
    read_line,
    request,
    write_line,
)
from trainctl.checkpoint.slot_catalog import checksums_json, crc_text, entry_sum, record_json
from trainctl.checkpoint.slot_layout import SLOT_SUM, SlotRecord, read_json, write_json_atomic

PUT_SLOT = "put_slot_v2"
"""The op of this release's slot put."""
PUT_SLOT_V1 = "put_slot"
"""The previous release's slot put (the receiver sums)."""
LOWAT = 2**20
"""Bytes the receiver waits for before it is woken to read (fewer, larger reads: ~45 reads of
~140 KiB per 6 MiB slot without it)."""
_CRC = re.compile(r"^[0-9a-f]{8}$")
_V1_PEERS: set[str] = set()
"""Endpoints that answered `PUT_SLOT` with ``unknown op``: sent version 1 from then on."""


# ------------------------------------------------------------------ the sender


def _send_paced(sock: socket.socket, source: str, size: int, bandwidth: float) -> None:
    """The `size` bytes of the file `source` by ``sendfile``, in CHUNKs paced to `bandwidth`."""
    started = time.monotonic()
    with open(source, "rb") as file:
        for offset in range(0, size, CHUNK):
            count = min(CHUNK, size - offset)
            if sock.sendfile(file, offset, count) != count:
                raise PeerError(f"{source} shrank while it was sent")
            ahead = (offset + count) / bandwidth - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _answer(stream: Any, endpoint: str) -> dict[str, Any]:
    """The peer's next answer; raises PeerError when it refused."""
    return _ok(read_line(stream), endpoint)


def _ok(answer: dict[str, Any], endpoint: str) -> dict[str, Any]:
    if not answer.get("ok"):
        raise PeerError(f"peer {endpoint}: {answer.get('error')}")
    return answer


def put_slot(
    endpoint: str,
    token: str,
    path: str,
    source: str,
    record: dict[str, Any],
    entries: list[tuple[int, int]],
    crcs: list[str],
    bandwidth: float,
    protocol: int = 2,
) -> None:
    """Send the slot file `source` (its record ``source.json`` holding `record`, its entries'
    CRCs `crcs`) into the held slot `path` at the peer, by ``sendfile`` paced to `bandwidth`
    bytes/s: `PUT_SLOT`, or version 1 (`protocol` 1, or a peer of the previous release:
    `entries` are the spans it sums). Raises PeerError when the peer refused it or is
    unreachable, or when `source`'s record changed before the peer had read every byte (the
    worker rewrote the slot: not kept)."""
    size = os.path.getsize(source)
    if protocol >= 2 and endpoint not in _V1_PEERS:
        fields = {"op": PUT_SLOT, "path": path, "size": size, "crcs": list(crcs)}
        with connection(endpoint, {**fields, "record": record}, token) as (sock, stream):
            ready = read_line(stream)
            if ready.get("ok") or "unknown op" not in str(ready.get("error")):
                _ok(ready, endpoint)
                _send_paced(sock, source, size, bandwidth)
                _answer(stream, endpoint)  # every byte is in the peer's slot now
                _commit(stream, endpoint, source, record)
                return
        _V1_PEERS.add(endpoint)  # a previous release: it sums what it receives
    fields = {
        "op": PUT_SLOT_V1,
        "path": path,
        "size": size,
        "entries": [list(span) for span in entries],
        "crcs": list(crcs),
        "record": record,
        "checksums": {"step": record["step"], "layout": record["layout"]},
    }

    def send(_stream: Any, sock: socket.socket) -> None:
        _send_paced(sock, source, size, bandwidth)

    request(endpoint, fields, token, send)


def _commit(stream: Any, endpoint: str, source: str, record: dict[str, Any]) -> None:
    """Tell the peer, which has read every byte, to record the slot when `source`'s record is
    still `record` (the worker removes it before it rewrites the slot), else to drop it."""
    now = SlotRecord.from_json(read_json(f"{source}.json"))
    commit = now is not None and now == SlotRecord.from_json(record)
    write_line(stream, {"commit": commit})
    stream.flush()
    if not commit:
        raise PeerError(f"{source} was rewritten while it was sent: not kept")
    _answer(stream, endpoint)


# ------------------------------------------------------------------ the receiver


class HeldMaps:
    """Writable shared mappings of held slot files, kept from one put to the next (one server's).

    Mapping a 6 MiB slot afresh for every put costs ~0.5 ms of CPU (its page tables, then the
    unmap) on every replication round. A mapping is kept while its path names the same file
    (inode and size: a slot of another size is a new file, renamed into place, never truncated
    under a mapping); `prune` releases those of files gone or replaced (the holder calls it
    after it drops a node's replicas). One put per slot at a time: a second is refused."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap]] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def take(self, path: str, size: int) -> mmap.mmap:
        """The mapping of the slot file `path`, created (or replaced) at `size` bytes; call
        `give_back(path)` when the put is over."""
        with self._lock:
            if path in self._busy:
                raise PeerError(f"{os.path.basename(path)}: another put of this slot is under way")
            self._busy.add(path)
        try:
            return self._map(path, size)
        except BaseException:
            self.give_back(path)
            raise

    def give_back(self, path: str) -> None:
        with self._lock:
            self._busy.discard(path)

    def _map(self, path: str, size: int) -> mmap.mmap:
        try:
            stat = os.stat(path)
            key: tuple[int, int] | None = (stat.st_ino, stat.st_size)
        except FileNotFoundError:
            key = None
        with self._lock:
            known = self._maps.get(path)
        if known is not None and known[0] == key and key[1] == size:
            return known[1]
        self._forget(path)
        if key is None or key[1] != size:
            _new_file(path, size)
        with open(path, "r+b") as file:
            stat = os.fstat(file.fileno())
            # MAP_POPULATE: the pages mapped in one call, not one fault per page as bytes land.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(file.fileno(), size, flags=flags)
        with self._lock:
            self._maps[path] = ((stat.st_ino, stat.st_size), mapped)
        return mapped

    def _forget(self, path: str) -> None:
        with self._lock:
            known = self._maps.pop(path, None)
        if known is not None:
            try:
                known[1].close()
            except BufferError:  # a view is still out: the mapping goes with it
                pass

    def prune(self) -> None:
        """Release the mappings whose path no longer names the mapped file (not one in use)."""
        with self._lock:
            paths = [path for path in self._maps if path not in self._busy]
        for path in paths:
            with self._lock:
                key = self._maps[path][0] if path in self._maps else None
            try:
                stat = os.stat(path)
                same = (stat.st_ino, stat.st_size) == key
            except OSError:
                same = False
            if not same:
                self._forget(path)

    def close(self) -> None:
        with self._lock:
            paths = list(self._maps)
        for path in paths:
            self._forget(path)


def _new_file(path: str, size: int) -> None:
    """A slot file of `size` bytes at `path`, renamed over what was there (never truncated in
    place: a reader may have the old file mapped)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.new-{threading.get_ident()}"
    try:
        with open(temporary, "wb") as file:
            file.truncate(size)
            if size:
                os.posix_fallocate(file.fileno(), 0, size)  # ENOSPC here, not a SIGBUS later
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _drop_record(path: str) -> None:
    """The held slot at `path` is not whole from now: its record and checksums go first."""
    for stale in (f"{path}.json", f"{path}.crc.json"):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


def receive_slot(
    sock: socket.socket, rfile: Any, wfile: Any, path: str, request: dict[str, Any], maps: HeldMaps
) -> None:
    """Serve a `PUT_SLOT` into the held slot `path` (the module's docstring has the steps);
    returns once the checksums and the record are written, raises PeerError when the sender
    withdrew or the connection was cut (then the slot has no record)."""
    size = int(request["size"])
    record = SlotRecord.from_json(request.get("record"))
    crcs = request.get("crcs")
    if record is None or not isinstance(crcs, list) or size < 0:
        raise PeerError(f"{PUT_SLOT}: a record, the CRCs and a size are required")
    if not all(isinstance(crc, str) and _CRC.match(crc) for crc in crcs):
        raise PeerError(f"{PUT_SLOT}: every CRC is 8 hex digits ({SLOT_SUM})")
    _drop_record(path)
    mapped = maps.take(path, size)
    try:
        write_line(wfile, {"ok": True, "ready": True})
        wfile.flush()
        view = memoryview(mapped)
        try:
            _recv_into(sock, view[:size])
        finally:
            view.release()
        write_line(wfile, {"ok": True, "received": size})
        wfile.flush()
        if read_line(rfile).get("commit") is not True:
            raise PeerError(f"{PUT_SLOT}: the sender withdrew the slot (it changed while sent)")
        write_json_atomic(f"{path}.crc.json", checksums_json(record, crcs))
        write_json_atomic(f"{path}.json", record_json(record))
    finally:
        maps.give_back(path)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock` (nothing may be left in a buffered reader of it), woken only
    once `LOWAT` bytes wait (``SO_RCVLOWAT``), not for every segment that lands."""
    done, size = 0, view.nbytes
    try:
        while done < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(LOWAT, size - done))
            got = sock.recv_into(view[done : min(size, done + CHUNK)])
            if not got:
                raise PeerError(f"connection closed with {size - done} bytes to come")
            done += got
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def receive_slot_v1(rfile: Any, path: str, request: dict[str, Any]) -> None:
    """Serve a `PUT_SLOT_V1`: the bytes in place into the held slot `path`, every entry's CRC
    checked against the sender's, then the checksums and the record."""
    size = int(request["size"])
    spans = [(int(offset), int(nbytes)) for offset, nbytes in request["entries"]]
    expected = [str(crc) for crc in request["crcs"]]
    record = SlotRecord.from_json(request["record"])
    if record is None or len(expected) != len(spans):
        raise PeerError("put_slot: a record and one CRC per entry are required")
    if any(offset < 0 or offset + nbytes > size for offset, nbytes in spans):
        raise PeerError(f"put_slot: an entry lies outside the slot's {size} bytes")
    _drop_record(path)
    if not os.path.exists(path) or os.path.getsize(path) != size:
        _new_file(path, size)  # not truncated in place: `HeldMaps` may have it mapped
    with open(path, "r+b") as file:
        got = _receive_summing(rfile, file, size, spans)
    bad = [i for i, (want, have) in enumerate(zip(expected, got, strict=True)) if want != have]
    if bad:
        raise PeerError(
            f"put_slot {os.path.basename(path)}: entry {bad[0]} (of {len(bad)} bad) fails "
            f"its CRC ({got[bad[0]]} != {expected[bad[0]]}): the record is not written"
        )
    sums = {**request["checksums"], "algorithm": SLOT_SUM, "crcs": expected}  # as summed here
    write_json_atomic(f"{path}.crc.json", sums)
    write_json_atomic(f"{path}.json", request["record"])


def _receive_summing(rfile: Any, file: Any, size: int, spans: list[tuple[int, int]]) -> list[str]:
    """Read `size` bytes from the connection straight into the file's pages; the CRC of
    every span, each summed as soon as its last byte arrived (while the rest streams in)."""
    crcs = [crc_text(0)] * len(spans)
    if size == 0:
        return crcs
    order = sorted(range(len(spans)), key=lambda i: spans[i][0] + spans[i][1])
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with mmap.mmap(file.fileno(), size, flags=flags) as mapped:
        view = memoryview(mapped)
        try:
            done, ready = 0, 0
            while done < size:
                got = rfile.readinto(view[done : min(size, done + CHUNK)])
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
