"""The protocol: every message round-trips typed; anything else is refused, never a crash.

The transport tests use the real `ControlServer` and raw sockets on 127.0.0.1, port 0.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import socket
import time
from typing import Any

import pytest

from trainctl.health.liveness import LivenessPolicy
from trainctl.launch.control import ControlServer
from trainctl.launch.control_agent import ControlClient, WorkerChannel
from trainctl.protocol import (
    AGENT_MESSAGES,
    CONTROLLER_MESSAGES,
    Disconnected,
    DumpStacks,
    Envelope,
    ErrorFile,
    Exit,
    GatePlan,
    Heartbeat,
    Hello,
    Launch,
    Message,
    Probe,
    Progress,
    ProtocolError,
    Refused,
    Result,
    Shutdown,
    StackDump,
    StacksReport,
    Started,
    Stop,
    VerdictReport,
    WarmUp,
    WorkerEvent,
    WorkerProgress,
    decode_datagram,
    decode_line,
    encode_datagram,
    encode_line,
    new_token,
)

TOKEN = "t0k3n"

SAMPLES: list[Message] = [
    Hello(41),
    VerdictReport("preflight", {"node": "node-0", "status": "OK"}),
    Started(41, 42),
    Started(41, 42, 8),
    Progress({"0": Heartbeat(5, 1.5, 0.2, 0.1, False, ((4, 0.2, None), (5, 0.2, 0.1)))}),
    Result(0, 30, "ab" * 32),
    WorkerEvent("checkpoint_committed", "committed step 10", 0, {"step": 10, "stall_s": 0.1}),
    StacksReport((StackDump(1, 0, 99, "T", "py-spy", "Thread 1", ("faulthandler: x",)),), 0.3),
    StacksReport((StackDump(1, 0, 99, "S", None, None, (), 12, "nccl:all_reduce #12", "{}"),)),
    Exit(-9, False, "", (ErrorFile("/e/error.json", "RuntimeError: boom", 1.5, "0"),), 2),
    Exit(-6, crashes=("rank 3: SIGABRT",), flight_recorders={"3": '{"entries": []}'}),
    Launch("/run/attempt-0/plan.json"),
    Stop("node-1: node agent lost", "kill"),
    Probe("standby", GatePlan(("/run", "/store"), 2.0, True, 0.0), "127.0.0.1:29500"),
    WarmUp("/run/logs/node-1.log"),
    DumpStacks("hang"),
    Shutdown("job ended"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    allowed = AGENT_MESSAGES if isinstance(message, AGENT_MESSAGES) else CONTROLLER_MESSAGES
    line = encode_line(Envelope(message, "node-1", 3, 12.5), TOKEN)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    envelope = decode_line(line, TOKEN, allowed)
    assert envelope == Envelope(message, "node-1", 3, 12.5)


def test_worker_datagrams_round_trip() -> None:
    for message in (
        WorkerProgress(1, 7, 3.0, 0.5, None, saving=True),
        Result(1, 7, "f" * 64),
        WorkerEvent("my_kind", "hello", 1, {"anything": [1, 2]}),
    ):
        assert decode_datagram(encode_datagram(message, TOKEN), TOKEN) == message


def _line(**fields: Any) -> bytes:
    base: dict[str, Any] = {"type": "hello", "pid": 1, "node": "node-0", "attempt": None}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_line(token=...), "token"),
        (_line(token="guess"), "token"),
        (_line(token=TOKEN, type="launch_missiles"), "unknown message type"),
        (_line(token=TOKEN, type="disconnected"), "unknown message type"),
        (_line(token=TOKEN, pid="many"), "hello: pid"),
        (_line(token=TOKEN, node=...), "missing node"),
        (_line(token=TOKEN, attempt="2"), "attempt"),
        (_line(token=TOKEN, type="exit", code=1, errors=[{"file": 3}]), "exit: errors.0"),
        (_line(token=TOKEN, type="progress", ranks={"0": {"step": "x"}}), "progress: ranks"),
    ],
)
def test_bad_lines_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_line(raw, TOKEN, AGENT_MESSAGES)


def test_a_controller_message_is_not_an_agent_message() -> None:
    line = encode_line(Envelope(Shutdown("x"), "node-0"), TOKEN)
    with pytest.raises(ProtocolError, match="unknown message type 'shutdown'"):
        decode_line(line, TOKEN, AGENT_MESSAGES)


def test_tokens_are_fresh_and_unguessable() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) == 32 for t in tokens)


# -- the transport ----------------------------------------------------------------------------


def _take(server: ControlServer, timeout_s: float = 5.0) -> Envelope:
    return server.messages.get(timeout=timeout_s)


def _raw_connection(server: ControlServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_stranger_is_refused_and_disconnected() -> None:
    server = ControlServer(TOKEN)
    try:
        for line in (b"GET / HTTP/1.1\r\n", _line(token="guess") + b"\n"):
            sock = _raw_connection(server)
            sock.sendall(line)
            refused = _take(server)
            assert isinstance(refused.message, Refused) and refused.node == "?"
            assert _closed_by_peer(sock)
            sock.close()
        # a valid line that is not a hello first: refused too
        sock = _raw_connection(server)
        sock.sendall(encode_line(Envelope(Started(1, 2), "node-0"), TOKEN))
        refused = _take(server)
        assert isinstance(refused.message, Refused) and "before hello" in refused.message.reason
        assert _closed_by_peer(sock)
        with pytest.raises(queue.Empty):  # no Disconnected: it never was a node
            server.messages.get(timeout=0.3)
    finally:
        server.close()


def test_after_hello_bad_lines_are_dropped_and_reported_a_few_times() -> None:
    server = ControlServer(TOKEN)
    client = ControlClient(server.endpoint, "node-3", TOKEN)
    try:
        client.send(Hello(7), None)
        assert _take(server) == Envelope(
            Hello(7), "node-3", None, pytest.approx(time.time(), abs=5)
        )
        sock = client._sock
        for _ in range(8):
            sock.sendall(b"{broken\n")
        client.send(Started(7, 8), 0)
        refused = [_take(server) for _ in range(5)]
        assert all(isinstance(e.message, Refused) and e.node == "node-3" for e in refused)
        assert _take(server).message == Started(7, 8)  # the connection survived
        assert server.send("node-3", Stop("test", "graceful"))
        assert client.inbox.get(timeout=5) == Stop("test", "graceful")
    finally:
        client.close()
    assert isinstance(_take(server).message, Disconnected)
    server.close()


def test_the_client_drops_what_the_controller_did_not_sign() -> None:
    server = ControlServer("the-real-one")
    client = ControlClient(server.endpoint, "node-0", "another-job")
    try:
        client.send(Hello(1), None)
        refused = _take(server)
        assert isinstance(refused.message, Refused) and "token" in refused.message.reason
        assert isinstance(client.inbox.get(timeout=5), Disconnected)
    finally:
        client.close()
        server.close()


def test_worker_channel_keeps_only_its_workers_datagrams() -> None:
    address = f"@trainctl-test/channel/{time.monotonic_ns()}"
    channel = WorkerChannel(address, TOKEN)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        target = "\0" + address[1:]
        good = WorkerProgress(0, 3, 1.0)
        sender.sendto(encode_datagram(good, TOKEN), target)
        sender.sendto(encode_datagram(good, "forged"), target)
        sender.sendto(b"\xff\xfe", target)
        sender.sendto(encode_datagram(dataclasses.replace(good, step=4), TOKEN), target)
        time.sleep(0.05)
        assert channel.drain() == [good, dataclasses.replace(good, step=4)]
        assert channel.dropped == 2
    finally:
        sender.close()
        channel.close()


FAST = LivenessPolicy(interval_s=0.05, threshold=8.0, acceptable_pause_s=0.3, min_std_s=0.02)


def test_a_peer_that_stops_beating_is_silent_without_any_fin() -> None:
    server = ControlServer(TOKEN, liveness=FAST)
    client = ControlClient(server.endpoint, "node-0", TOKEN, liveness=FAST)
    try:
        client.send(Hello(1), None)
        assert isinstance(_take(server).message, Hello)
        time.sleep(0.6)  # beats flow both ways: neither side is suspected
        assert server.silent() == [] and client.silent() is None
        # The agent's beats stop but its socket stays open (a frozen host): only the
        # heartbeats can tell, and they do.
        client._closed.set()
        deadline = time.monotonic() + 5
        while not server.silent() and time.monotonic() < deadline:
            time.sleep(0.02)
        (silent,) = server.silent()
        assert silent.peer == "node-0" and silent.reason.startswith("silent for")
        assert time.time() - silent.last_heard < 5
        # ... and the other way round: the controller's beats stop.
        server._closed.set()
        deadline = time.monotonic() + 5
        while client.silent() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (client.silent() or "").startswith("silent for")
    finally:
        client.close()
        server.close()


def test_only_a_node_s_current_connection_ending_says_it_is_gone() -> None:
    server = ControlServer(TOKEN)
    old = ControlClient(server.endpoint, "node-0", TOKEN)
    new = ControlClient(server.endpoint, "node-0", TOKEN)
    try:
        old.send(Hello(1), None)
        assert _take(server).message == Hello(1)
        new.send(Hello(2), None)  # the node's agent was replaced
        assert _take(server).message == Hello(2)
        old.close()  # the old agent's connection ends late: not the node going away
        with pytest.raises(queue.Empty):
            server.messages.get(timeout=0.5)
        assert server.send("node-0", Stop("still there", "kill"))
        assert new.inbox.get(timeout=5) == Stop("still there", "kill")
        server.drop("node-0")  # dropped on purpose: nothing to report either
        with pytest.raises(queue.Empty):
            server.messages.get(timeout=0.5)
    finally:
        new.close()
        server.close()


def test_any_message_counts_as_a_beat_both_for_the_judge_and_the_sender() -> None:
    # The controller's side: an agent that sends progress and no beats is alive...
    server = ControlServer(TOKEN, liveness=FAST)
    sock = _raw_connection(server)
    try:
        sock.sendall(encode_line(Envelope(Hello(1), "node-0"), TOKEN))
        assert isinstance(_take(server).message, Hello)
        progress = Progress({"0": Heartbeat(step=1)})
        for _ in range(30):  # 0.6 s: far past the 0.3 s pause, without a single beat
            sock.sendall(encode_line(Envelope(progress, "node-0", time=time.time()), TOKEN))
            time.sleep(0.02)
            assert server.silent() == []
        # ... and once it falls silent, it is suspected (no FIN: the socket stays open).
        deadline = time.monotonic() + 5
        while not server.silent() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [s.peer for s in server.silent()] == ["node-0"]
    finally:
        sock.close()
        server.close()
    # The agent's side: no beat goes out while messages do, beats resume once they stop.
    listener = socket.create_server(("127.0.0.1", 0))
    policy = dataclasses.replace(FAST, interval_s=0.2)
    client = ControlClient(
        f"127.0.0.1:{listener.getsockname()[1]}", "node-0", TOKEN, liveness=policy
    )
    conn, _ = listener.accept()
    try:
        for _ in range(30):
            client.send(Hello(1), None)
            time.sleep(0.02)
        time.sleep(0.5)
        conn.settimeout(1)
        received = b""
        while received.count(b"\n") < 30 + 2:
            received += conn.recv(1 << 16)
        types = [json.loads(line)["type"] for line in received.splitlines()]
        assert types[:30] == ["hello"] * 30 and set(types[30:]) == {"beat"}
    finally:
        client.close()
        conn.close()
        listener.close()
