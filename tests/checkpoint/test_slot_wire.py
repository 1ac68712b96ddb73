"""The held-slot put between holders (`trainctl.checkpoint.slot_wire`), against a real peer
server on loopback: the sender's CRCs kept (summed once), the record written only after the
receiver read every byte and the sender confirmed its slot did not change meanwhile, nothing
recorded for a transfer cut or withdrawn mid-way, and either side of the previous release's
version 1 served."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest

from trainctl.checkpoint import slot_wire
from trainctl.checkpoint.peer_wire import PeerError, PeerServer, remote_crcs
from trainctl.checkpoint.slot_layout import read_json, write_json_atomic
from trainctl.checkpoint.slot_wire import PUT_SLOT, put_slot

TOKEN = "t0ken"
HELD = "held/n0/slots/rank-00000.slot-0"
ENTRIES = [(0, 1000), (1024, 3000), (4096, 6144)]
RECORD = {"step": 3, "attempt": 0, "layout": "d"}


def _crcs(data: bytes) -> list[str]:
    return [f"{crc32c.crc32c(data[o : o + n]):08x}" for o, n in ENTRIES]


def _wait(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A sender's slot file with its record, as a worker leaves them."""
    path = tmp_path / "rank-00000.slot-1"
    path.write_bytes(bytes(range(256)) * 40)
    write_json_atomic(f"{path}.json", RECORD)
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PeerServer]:
    peer = PeerServer(str(tmp_path / "peer"), TOKEN, "127.0.0.1").start()
    yield peer
    peer.close()


def _held(server: PeerServer, suffix: str = "") -> Any:
    return read_json(os.path.join(server.root, f"{HELD}{suffix}"))


def _put(server: PeerServer, source: Path, crcs: list[str] | None = None, **record: Any) -> None:
    sums = _crcs(source.read_bytes()) if crcs is None else crcs
    wanted = {**RECORD, **record}
    put_slot(server.endpoint, TOKEN, HELD, str(source), wanted, ENTRIES, sums, 1e9)


def _open_put(server: PeerServer, size: int, step: int) -> tuple[socket.socket, Any]:
    """A raw sender's connection that has sent a `PUT_SLOT` header and read `ready`."""
    host, port = server.endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    stream = sock.makefile("rwb")
    header = {
        "op": PUT_SLOT,
        "token": TOKEN,
        "path": HELD,
        "size": size,
        "crcs": ["00000000"] * len(ENTRIES),
        "record": {**RECORD, "step": step},
    }
    stream.write(json.dumps(header).encode() + b"\n")
    stream.flush()
    assert json.loads(stream.readline())["ready"] is True
    return sock, stream


def test_the_senders_crcs_are_kept_and_the_record_written_last(
    server: PeerServer, source: Path
) -> None:
    crcs = _crcs(source.read_bytes())
    _put(server, source)
    assert _held(server, ".json") == RECORD
    assert _held(server, ".crc.json") == {
        "step": 3,
        "layout": "d",
        "algorithm": "crc32c",
        "crcs": crcs,
    }
    assert Path(server.root, HELD).read_bytes() == source.read_bytes()
    # The next step into the same held slot: same mapping, new bytes, new record.
    source.write_bytes(bytes(reversed(source.read_bytes())))
    write_json_atomic(f"{source}.json", {**RECORD, "step": 5})
    _put(server, source, step=5)
    assert _held(server, ".json")["step"] == 5
    assert Path(server.root, HELD).read_bytes() == source.read_bytes()
    # A slot of another size (a new layout) is a new file, not one truncated under a mapping.
    inode = os.stat(os.path.join(server.root, HELD)).st_ino
    source.write_bytes(b"\x07" * 20000)
    write_json_atomic(f"{source}.json", {**RECORD, "step": 6})
    _put(server, source, step=6)
    assert os.stat(os.path.join(server.root, HELD)).st_ino != inode
    assert Path(server.root, HELD).read_bytes() == source.read_bytes()


def test_a_transfer_cut_mid_way_leaves_no_record(server: PeerServer, source: Path) -> None:
    _put(server, source)
    sock, stream = _open_put(server, source.stat().st_size, step=4)
    # `ready` came: the held slot is no longer whole, its record and checksums are gone.
    assert _held(server, ".json") is None and _held(server, ".crc.json") is None
    sock.sendall(source.read_bytes()[:5000])
    stream.close()
    sock.close()
    # The receiver gives the slot up; a later put of it succeeds and records again.
    _wait(lambda: _try_put(server, source), "the cut put to release the held slot")
    assert _held(server, ".json") == RECORD


def _try_put(server: PeerServer, source: Path) -> bool:
    try:
        _put(server, source)
    except PeerError as error:
        assert "another put of this slot" in str(error)
        return False
    return True


def test_a_withdrawn_transfer_leaves_no_record(server: PeerServer, source: Path) -> None:
    sock, stream = _open_put(server, source.stat().st_size, step=4)
    with sock:
        sock.sendall(source.read_bytes())
        assert json.loads(stream.readline())["received"] == source.stat().st_size
        stream.write(b'{"commit": false}\n')
        stream.flush()
        answer = json.loads(stream.readline())
    assert answer["ok"] is False and "withdrew" in answer["error"]
    assert _held(server, ".json") is None and _held(server, ".crc.json") is None


def test_a_slot_rewritten_after_it_was_summed_is_not_committed(
    server: PeerServer, source: Path
) -> None:
    _put(server, source)
    # The worker wrote step 4 into the slot after the holder summed step 3: the sender sees
    # the new record once the peer has the bytes, and withdraws them.
    write_json_atomic(f"{source}.json", {**RECORD, "step": 4})
    with pytest.raises(PeerError, match="rewritten while it was sent"):
        _put(server, source)
    assert _held(server, ".json") is None
    # Mid-rewrite (the worker removed the record first): withdrawn too.
    os.unlink(f"{source}.json")
    with pytest.raises(PeerError, match="rewritten while it was sent"):
        _put(server, source)
    assert _held(server, ".json") is None


def test_sums_that_do_not_match_the_bytes_fail_the_restores_check(
    server: PeerServer, source: Path
) -> None:
    # Summed once, by the sender: the receiver keeps what it was given. A copy whose bytes do
    # not match its sums (memory corruption) is refused where every copy is verified before
    # use: the restore compares the copy's sums, taken at its holder, with the recorded ones.
    wrong = ["00000000"] * len(ENTRIES)
    _put(server, source, crcs=wrong)
    recorded = _held(server, ".crc.json")["crcs"]
    assert recorded == wrong
    fresh = remote_crcs(server.endpoint, TOKEN, HELD, ENTRIES)
    assert fresh == _crcs(source.read_bytes()) and fresh != recorded


def test_a_previous_release_peer_gets_version_1_and_sums_what_it_receives(
    tmp_path: Path, source: Path
) -> None:
    old = PeerServer(str(tmp_path / "old"), TOKEN, "127.0.0.1", protocol=1).start()
    endpoint = old.endpoint
    try:
        crcs = _crcs(source.read_bytes())
        put_slot(old.endpoint, TOKEN, HELD, str(source), RECORD, ENTRIES, crcs, 1e9)
        assert old.endpoint in slot_wire._V1_PEERS
        assert read_json(os.path.join(old.root, f"{HELD}.json")) == RECORD
        wrong = [crcs[0], "00000000", crcs[2]]
        with pytest.raises(PeerError, match="entry 1"):
            put_slot(old.endpoint, TOKEN, HELD, str(source), RECORD, ENTRIES, wrong, 1e9)
        assert read_json(os.path.join(old.root, f"{HELD}.json")) is None
    finally:
        old.close()
        slot_wire._V1_PEERS.discard(endpoint)


def test_a_previous_release_sender_is_served_and_checked(server: PeerServer, source: Path) -> None:
    crcs = _crcs(source.read_bytes())
    put_slot(server.endpoint, TOKEN, HELD, str(source), RECORD, ENTRIES, crcs, 1e9, protocol=1)
    assert _held(server, ".json") == RECORD and _held(server, ".crc.json")["crcs"] == crcs
    with pytest.raises(PeerError, match="fails its CRC"):
        put_slot(server.endpoint, TOKEN, HELD, str(source), RECORD, ENTRIES, ["0" * 8] * 3, 1e9, 1)
    assert _held(server, ".json") is None
