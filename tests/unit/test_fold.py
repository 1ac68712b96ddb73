"""Per-node events folded at scale (`trainctl.recovery.fold`, `Journal.node_event`), the
controller's inbox (`trainctl.launch.inbox`) and the intervals that grow with the node count."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from trainctl.events import AgentConnected, NodeEvents, NodeStarted
from trainctl.health.liveness import controller_beat_interval, progress_interval
from trainctl.launch.inbox import Inbox
from trainctl.protocol import Disconnected, Envelope, Exit, Hello, Progress
from trainctl.recovery import fold, policy
from trainctl.recovery.journal import Journal
from trainctl.recovery.progress_recorder import flush_interval
from trainctl.state import AttemptRecord, JobRecord, NodeRecord
from trainctl.store import JobStore


@pytest.mark.parametrize(
    ("opened_at", "written", "now", "expected"),
    [
        (None, 0, 5.0, (True, True)),  # the first of its kind: written, a window opens
        (5.0, 1, 5.1, (True, False)),
        (5.0, fold.KEEP_EACH - 1, 5.9, (True, False)),  # the last one written on its own
        (5.0, fold.KEEP_EACH, 5.9, (False, False)),  # past that: held for the fold
        (5.0, fold.KEEP_EACH, 5.0 + fold.WINDOW_S, (True, True)),  # the window is over
    ],
)
def test_admit(
    opened_at: float | None, written: int, now: float, expected: tuple[bool, bool]
) -> None:
    assert fold.admit(opened_at, written, now) == expected


@pytest.mark.parametrize(
    ("code", "stopped", "errors", "crashes", "expected"),
    [
        (0, False, 0, 0, True),  # finished
        (143, True, 0, 0, True),  # stopped by the controller at a relaunch
        (1, False, 0, 0, False),  # failed
        (0, False, 1, 0, False),  # an error file: evidence, never folded
        (-9, True, 0, 1, False),  # stopped, but a worker was OOM-killed first
    ],
)
def test_which_exits_are_routine(
    code: int, stopped: bool, errors: int, crashes: int, expected: bool
) -> None:
    assert fold.routine_exit(code, stopped, errors, crashes) is expected


def test_the_folder_holds_what_is_past_the_window_s_share_and_releases_it_once() -> None:
    folder = fold.Folder()
    admitted = [folder.admit("agent_connected", 0.01 * i) for i in range(20)]
    assert admitted == [True] * fold.KEEP_EACH + [False] * (20 - fold.KEEP_EACH)
    for i in range(fold.KEEP_EACH, 20):
        folder.hold("agent_connected", fold.Held(float(i), f"node-{i}", 0, {"pid": i}))
    assert folder.admit("node_started", 0.5)  # kinds have windows of their own
    assert folder.due(0.5) == []  # the window is not over
    [(kind, held)] = folder.due(fold.WINDOW_S)
    assert kind == "agent_connected" and [h.node for h in held][:2] == ["node-8", "node-9"]
    assert folder.due(fold.WINDOW_S + 5) == []  # released once
    assert folder.admit("agent_connected", fold.WINDOW_S + 5)  # a new window


def make_journal(storage: Path, nodes: int) -> Journal:
    store = JobStore(str(storage))
    record = JobRecord(
        "big", "big", 0.0, 0.0, nodes=[NodeRecord(f"node-{i}") for i in range(nodes)]
    )
    record.attempts.append(AttemptRecord(number=0, started_at=0.0, world_size=nodes))
    store.create(record, "name: big\n")
    return Journal(store, record)


def test_a_thousand_agents_up_are_a_few_events_and_every_node_is_in_them(tmp_path: Path) -> None:
    journal = make_journal(tmp_path, 1000)
    for i in range(1000):
        journal.node_event(AgentConnected(pid=i), f"node-{i}: agent up", f"node-{i}")
    journal.flush_folds(every=True)
    events = journal.store.read_events("big").events
    single = [e for e in events if e.kind == "agent_connected"]
    folds = [e for e in events if isinstance(e.data, NodeEvents)]
    assert len(single) == fold.KEEP_EACH  # the 1,000 agents said hello within one window
    assert len(folds) == 1 and folds[0].attempt == 0
    data = folds[0].data
    assert isinstance(data, NodeEvents) and data.of_kind == "agent_connected"
    named = {e.node for e in single} | set(data.nodes)
    assert named == {f"node-{i}" for i in range(1000)}
    assert data.data["node-999"] == {"pid": 999}
    assert folds[0].message.startswith(f"{1000 - fold.KEEP_EACH} node(s): agent up (node-8, …")


def test_a_small_job_keeps_one_event_a_node(tmp_path: Path) -> None:
    journal = make_journal(tmp_path, 3)
    for i in range(3):
        journal.node_event(NodeStarted(agent_pid=i), f"node-{i}: torchrun started", f"node-{i}")
    journal.flush_folds(every=True)
    kinds = [(e.kind, e.node) for e in journal.store.read_events("big").events]
    assert kinds == [("node_started", f"node-{i}") for i in range(3)]


def test_an_attempt_s_end_writes_what_is_held_before_it(tmp_path: Path) -> None:
    from trainctl.state import AttemptState

    journal = make_journal(tmp_path, 50)
    for i in range(50):
        journal.node_event(NodeStarted(agent_pid=i), f"node-{i}: torchrun started", f"node-{i}")
    journal.end_attempt(
        AttemptState.FAILED,
        "node-3 lost",
        exit_code=None,
        cause="node",
        blamed="node-3",
        failed_at=None,
        decided_at=1.0,
    )
    kinds = [e.kind for e in journal.store.read_events("big").events]
    assert kinds.count("node_events") == 1 and kinds[-1] == "attempt_ended"


def envelope(message: object, node: str) -> Envelope:
    return Envelope(message, node)  # type: ignore[arg-type]


def test_a_lost_node_jumps_the_queue_with_its_own_earlier_messages_in_order() -> None:
    inbox: queue.Queue[Envelope] = Inbox()
    sent = [
        envelope(Progress({}), "node-1"),
        envelope(Hello(7), "node-2"),
        envelope(Progress({}), "node-3"),
        envelope(Progress({}), "node-2"),
        envelope(Disconnected(), "node-2"),
        envelope(Exit(0), "node-3"),  # a clean exit keeps its place
        envelope(Exit(1, stopped=True), "node-1"),  # so does a stop
        envelope(Exit(1), "node-4"),  # a failure does not
    ]
    for item in sent:
        inbox.put(item)
    got = [inbox.get_nowait() for _ in range(len(sent))]
    assert [(type(e.message).__name__, e.node) for e in got] == [
        ("Hello", "node-2"),
        ("Progress", "node-2"),
        ("Disconnected", "node-2"),
        ("Exit", "node-4"),
        ("Progress", "node-1"),
        ("Progress", "node-3"),
        ("Exit", "node-3"),
        ("Exit", "node-1"),
    ]
    with pytest.raises(queue.Empty):
        inbox.get_nowait()


def test_a_round_handed_over_at_once_is_taken_as_if_put_one_by_one() -> None:
    """`put_many` (the read loop's round) orders exactly as `put` of each, urgent lane too."""
    sent = [
        envelope(Progress({}), "node-1"),
        envelope(Progress({}), "node-2"),
        envelope(Disconnected(), "node-2"),
        envelope(Exit(0), "node-3"),
        envelope(Exit(2), "node-1"),
    ]
    one_by_one, at_once = Inbox(), Inbox()
    for item in sent[:2]:
        one_by_one.put(item)
    at_once.put_many(sent[:2])
    for item in sent[2:]:
        one_by_one.put(item)
    at_once.put_many(sent[2:])
    at_once.put_many([])
    assert at_once.qsize() == one_by_one.qsize() == len(sent)
    assert [at_once.get_nowait() for _ in sent] == [one_by_one.get_nowait() for _ in sent]
    with pytest.raises(queue.Empty):
        at_once.get(timeout=0.01)


@pytest.mark.parametrize(
    ("nodes", "progress_s", "view_s"),
    [
        (1, 0.25, 2.0),
        (128, 0.25, 2.0),
        (512, 1.0, 2.0),
        (1024, 2.0, 4.0),
        (4096, 8.0, 16.0),
    ],
)
def test_what_is_rewritten_or_sent_per_node_slows_with_the_node_count(
    nodes: int, progress_s: float, view_s: float
) -> None:
    assert progress_interval(nodes) == progress_s
    assert controller_beat_interval(0.25, nodes) == progress_s  # the same rate
    assert flush_interval(nodes) == view_s


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (policy.NodeLost("n", 0.0), True),
        (policy.NodeUnhealthy("n", 0.0, "running", "XID 79"), True),
        (policy.NodeExit("n", 1, 0.0), True),
        (policy.NodeExit("n", 0, 0.0), False),
        (policy.NodeExit("n", 143, 0.0, stopped=True), False),
        (policy.StopRequested("SIGTERM", 0.0), False),
    ],
)
def test_what_stops_the_controller_reading_a_burst(
    seen: policy.Observation, expected: bool
) -> None:
    assert policy.failed(seen) is expected
