"""Reading events at scale: which files a page needs (pure, from names), and the readers on a
real store — the newest page, time and kind filters, the stream, the ledger's one fast pass
(same figures as reading every event in full) and `top`'s follower that reads only new files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import S3Endpoint
from tests.unit.test_goodput import SCENARIOS, _random_job
from trainctl.event_pages import (
    EventName,
    EventQuery,
    candidates,
    file_kind,
    newest,
    parse_name,
    tail_batches,
)
from trainctl.event_reader import EventFollower, decode, read_all, read_page, stream
from trainctl.events import UNREAD_DATA, Event, EventData, FirstStep, NodeExited, envelope_from_json
from trainctl.report.goodput import LEDGER_KINDS, build_ledger
from trainctl.state import JobRecord
from trainctl.store import JobStore

JOB = "pages-20261204-0001"
T0 = 1764547200.0


# -- names (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        (
            "01764547200000000-12-000003-first_step.json",
            EventName("", 1764547200000000, "first_step"),
        ),
        ("01764547200000000-12-000003-my-kind.json", EventName("", 1764547200000000, "my-kind")),
        ("01764547200000000-12-000003-.json", None),  # no kind
        ("1764547200-12-x-first_step.json", None),  # seq not a number
        ("notes.json", None),
        ("01764547200000000-12-000003-first_step.json.tmp", None),
    ],
)
def test_parse_name(name: str, parsed: EventName | None) -> None:
    got = parse_name(name)
    if parsed is None:
        assert got is None
    else:
        assert got is not None and (got.time_us, got.kind) == (parsed.time_us, parsed.kind)


def test_names_the_store_writes_parse_back(storage: Path) -> None:
    store = JobStore(str(storage))
    for kind, when in [("first_step", T0 + 0.1234567), ("weird kind/with:stuff", T0 + 2.5)]:
        store.append_event(JOB, Event(when, "m", EventData(), kind=kind))
    names = sorted(p.name for p in (storage / "jobs" / JOB / "events").iterdir())
    parsed = [parse_name(n) for n in names]
    assert [(p.time_us, p.kind) for p in parsed if p] == [
        (int((T0 + 0.1234567) * 1e6), "first_step"),
        (int((T0 + 2.5) * 1e6), file_kind("weird kind/with:stuff")),
    ]


def _name(when: float, kind: str, seq: int = 0) -> str:
    return f"{int(when * 1e6):017d}-7-{seq:06d}-{file_kind(kind)}.json"


@pytest.mark.parametrize("seed", range(20))
def test_names_never_drop_an_event_the_exact_filter_keeps(seed: int) -> None:
    """`may_admit` (on names) is a superset of `admits` (on events), to the microsecond."""
    rng = random.Random(seed)
    kinds = ["first_step", "node_exited", "x.y"]
    events = [
        Event(T0 + rng.uniform(0, 10), "", EventData(), kind=rng.choice(kinds)) for _ in range(300)
    ]
    low, high = sorted([T0 + rng.uniform(0, 10), T0 + rng.uniform(0, 10)])
    for query in (
        EventQuery(since=low),
        EventQuery(until=high),
        EventQuery(since=low, until=high, kinds=frozenset({"x.y"})),
        EventQuery(since=events[0].time, until=events[0].time),  # an exact bound
    ):
        for event in events:
            parsed = parse_name(_name(event.time, event.kind))
            assert parsed is not None
            if query.admits(event):
                assert query.may_admit(parsed), (query, event)


def test_candidates_are_time_ordered_and_skip_temporaries() -> None:
    names = [
        _name(T0 + 3, "b"),
        ".tmp-abc",
        _name(T0 + 1, "a"),
        "handwritten.json",
        _name(T0 + 2, "node_exited"),
        "readme.txt",
    ]
    found = candidates(names, EventQuery())
    assert found.named == (_name(T0 + 1, "a"), _name(T0 + 2, "node_exited"), _name(T0 + 3, "b"))
    assert found.unnamed == ("handwritten.json",) and found.count == 4
    kinds = candidates(names, EventQuery(kinds=frozenset({"node_exited"}), since=T0 + 1.5))
    assert kinds.named == (_name(T0 + 2, "node_exited"),)
    assert kinds.unnamed == ("handwritten.json",)  # cannot be judged by its name


@pytest.mark.parametrize(
    ("num_named", "limit", "batches"),
    [
        (0, 5, []),
        (3, 5, [(0, 3)]),
        (10, 5, [(5, 10), (0, 5)]),
        (100, 10, [(90, 100), (70, 90), (30, 70), (0, 30)]),
    ],
)
def test_tail_batches_newest_first_doubling(
    num_named: int, limit: int, batches: list[tuple[int, int]]
) -> None:
    assert tail_batches(num_named, limit) == batches


def test_newest_keeps_the_last_in_time_order() -> None:
    events = [Event(T0 + t, str(t), EventData(), kind="k") for t in (3, 1, 2, 5, 4)]
    assert [e.message for e in newest(events, 2)] == ["4", "5"]
    assert [e.message for e in newest(events, None)] == ["1", "2", "3", "4", "5"]
    assert newest(events, 0) == []


# -- readers on a real store ---------------------------------------------------------------
def write_events(storage: Path, count: int) -> JobStore:
    store = JobStore(str(storage))
    for i in range(count):
        data = NodeExited(code=i) if i % 3 else FirstStep(step=i)
        store.append_event(JOB, Event(T0 + i * 0.5, f"event {i}", data, node=f"node-{i % 4}"))
    return store


def test_page_is_the_newest_and_opens_only_those_files(storage: Path) -> None:
    store = write_events(storage, 60)
    everything = store.read_events(JOB).events
    directory = storage / "jobs" / JOB / "events"
    oldest = sorted(directory.iterdir())[:40]
    for path in oldest:  # were they opened, they would be problems
        path.write_text("not json")
    page = read_page(store, JOB, EventQuery(limit=10))
    assert [e.message for e in page.events] == [e.message for e in everything[-10:]]
    assert page.problems == [] and page.truncated and page.num_candidates == 60


def test_page_reads_further_back_past_unreadable_files(storage: Path) -> None:
    store = write_events(storage, 30)
    everything = store.read_events(JOB).events
    newest_file = sorted((storage / "jobs" / JOB / "events").iterdir())[-1]
    newest_file.write_text("{")  # a damaged newest file
    page = read_page(store, JOB, EventQuery(limit=5))
    assert [e.message for e in page.events] == [e.message for e in everything[-6:-1]]
    assert [p.url for p in page.problems] == [str(newest_file)]


def test_filters_match_reading_everything(storage: Path) -> None:
    store = write_events(storage, 50)
    everything = store.read_events(JOB).events
    query = EventQuery(since=T0 + 5, until=T0 + 20, kinds=frozenset({"first_step"}), limit=100)
    page = read_page(store, JOB, query)
    expected = [e for e in everything if query.admits(e)]
    assert [e.message for e in page.events] == [e.message for e in expected]
    assert len(expected) == 10 and not page.truncated


def test_stream_yields_every_event_in_order_in_batches(storage: Path) -> None:
    store = write_events(storage, 45)
    batches = list(stream(store, JOB, EventQuery(), batch=10))
    assert len(batches) == 5
    streamed = [e.message for events, _ in batches for e in events]
    assert streamed == [e.message for e in store.read_events(JOB).events]


def _ledger_json(record: JobRecord, events: list[Event], now: float) -> str:
    return json.dumps(build_ledger(record, events, now).to_json(), sort_keys=True)


def _through_light_decode(events: list[Event]) -> list[Event]:
    stored = [(f"e{i}", json.dumps(e.to_json()).encode()) for i, e in enumerate(events)]
    decoded, problems = decode(stored, LEDGER_KINDS)
    assert problems == []
    return decoded


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ledger_from_the_fast_pass_is_identical(name: str) -> None:
    record, events, now = SCENARIOS[name][0]()
    light = _through_light_decode(events)
    assert _ledger_json(record, light, now) == _ledger_json(record, events, now)


@pytest.mark.parametrize("seed", range(60))
def test_ledger_from_the_fast_pass_is_identical_on_random_jobs(seed: int) -> None:
    record, events, now = _random_job(random.Random(seed))
    light = _through_light_decode(events)
    assert _ledger_json(record, light, now) == _ledger_json(record, events, now)


def test_read_all_types_only_the_ledger_kinds(storage: Path) -> None:
    store = write_events(storage, 12)
    log = read_all(store, JOB, LEDGER_KINDS)
    assert len(log.events) == 12
    assert all(isinstance(e.data, FirstStep) for e in log.events if e.kind == "first_step")
    assert all(e.data is UNREAD_DATA for e in log.events if e.kind == "node_exited")


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"kind": "", "time": 1.0},
        {"kind": "x", "time": "soon"},
        {"kind": "x", "time": 1.0, "attempt": True},
        {"kind": "x", "time": 1.0, "node": 3},
        {"kind": "x", "time": 1.0, "v": 99},
        {"kind": "x", "time": 1.0, "data": [1]},
    ],
)
def test_envelope_is_refused_as_from_json_refuses_it(raw: object) -> None:
    with pytest.raises(ValueError) as full:
        Event.from_json(raw)
    with pytest.raises(ValueError) as light:
        envelope_from_json(raw)
    assert str(light.value) == str(full.value)


def test_follower_reads_each_file_once(storage: Path) -> None:
    store = write_events(storage, 10)
    follower = EventFollower(store, JOB, LEDGER_KINDS)
    assert len(follower.read().events) == 10
    for path in (storage / "jobs" / JOB / "events").iterdir():
        path.write_text("not json")  # never happens to a stored event: shows nothing is re-read
    store.append_event(JOB, Event(T0 + 100, "new", FirstStep(step=99)))
    log = follower.read()
    assert [e.message for e in log.events[-2:]] == ["event 9", "new"]
    assert log.problems == []


def test_readers_on_s3(s3: S3Endpoint) -> None:
    """The same pages and the one pass on an object store (a batch fetched concurrently)."""
    store = JobStore(s3.root("store"), s3.storage_options)
    for i in range(12):
        data = NodeExited(code=i) if i % 3 else FirstStep(step=i)
        store.append_event(JOB, Event(T0 + i * 0.5, f"event {i}", data))
    client = s3.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket)["Contents"])
    client.put_object(Bucket=s3.bucket, Key=keys[-1], Body=b"{")  # a damaged newest event
    page = read_page(store, JOB, EventQuery(limit=3))
    assert [e.message for e in page.events] == ["event 8", "event 9", "event 10"]
    assert [p.url.rsplit("/", 1)[-1] for p in page.problems] == [keys[-1].rsplit("/", 1)[-1]]
    log = read_all(store, JOB, LEDGER_KINDS)
    assert [e.message for e in log.events] == [f"event {i}" for i in range(11)]
    streamed = [
        e.message for events, _ in stream(store, JOB, EventQuery(), batch=5) for e in events
    ]
    assert streamed == [f"event {i}" for i in range(11)]
