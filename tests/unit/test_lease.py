"""The controller lease on a local root and on S3 (the session's moto server): conditional
writes, a live holder refused, a dead one taken over, a renewal conflict noticed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import S3Endpoint
from trainctl.launch.proctree import start_time
from trainctl.lease import Holder, Lease, LeaseHeld
from trainctl.store import JobStore, join
from trainctl.store_files import Conflict

TTL = 1.0


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "file":
        return JobStore(str(tmp_path / "store"))
    endpoint: S3Endpoint = request.getfixturevalue("s3")
    return JobStore(endpoint.root("store"), endpoint.storage_options)


def holder_of(store: JobStore) -> Holder:
    found = store.read_tagged(join(store.job_url("j"), "lease.json"))
    assert found is not None
    holder = Holder.parse(found[0])
    assert holder is not None
    return holder


def test_conditional_writes(store: JobStore) -> None:
    url = join(store.job_url("j"), "x.json")
    tag = store.replace_tagged(url, b"1", None)
    with pytest.raises(Conflict):
        store.replace_tagged(url, b"2", None)  # it exists now
    new = store.replace_tagged(url, b"3", tag)
    with pytest.raises(Conflict):
        store.replace_tagged(url, b"4", tag)  # stale tag
    current = store.read_tagged(url)
    assert current == (b"3", new)


def test_a_live_holder_on_this_host_is_refused_at_once(store: JobStore) -> None:
    first = Lease(store, "j", TTL)
    assert first.acquire() is None
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="already running"):
        Lease(store, "j", TTL).acquire()
    assert time.monotonic() - started < TTL  # no waiting for an expiry: the pid is alive
    first.release()
    assert holder_of(store).released
    second = Lease(store, "j", TTL)
    assert second.acquire() is None  # a released lease is free
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store: JobStore) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(gone.stdout)
    assert start_time(pid) is None
    document = {
        "host": Lease(store, "j").host,
        "pid": pid,
        "started": 12345,
        "holder_id": "dead",
        "renewed_at": time.time(),
        "ttl_s": 3600.0,
    }
    store.replace_tagged(
        join(store.job_url("j"), "lease.json"), json.dumps(document).encode(), None
    )
    lease = Lease(store, "j", TTL)
    previous = lease.acquire()
    assert previous is not None and previous.holder_id == "dead"
    assert holder_of(store).holder_id == lease.holder_id


def test_another_host_is_refused_while_renewed_and_takes_over_once_silent(
    store: JobStore,
) -> None:
    a = Lease(store, "j", TTL, host="host-a")
    a.acquire()
    a.start_renewing()
    b = Lease(store, "j", TTL, host="host-b")
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="on host-a"):
        b.acquire()
    assert time.monotonic() - started < TTL  # a renewal seen well before the expiry
    # host-a goes silent (a dead host: no release), host-b waits one TTL and takes over
    a._stop.set()
    a._thread.join()  # type: ignore[union-attr]
    started = time.monotonic()
    previous = Lease(store, "j", TTL, host="host-b").acquire()
    assert previous is not None and previous.host == "host-a"
    assert time.monotonic() - started >= TTL * 0.9
    assert not a.renew() and a.lost.is_set()  # host-a comes back: it lost the job


def test_two_hosts_racing_for_a_free_lease_one_wins(store: JobStore) -> None:
    leases = [Lease(store, "j", TTL, host=f"host-{i}") for i in range(2)]
    outcomes: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            leases[i].acquire()
            leases[i].start_renewing()
            outcomes[i] = "won"
        except LeaseHeld:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert sorted(outcomes.values()) == ["refused", "won"]
        winner = next(i for i, outcome in outcomes.items() if outcome == "won")
        assert holder_of(store).holder_id == leases[winner].holder_id
    finally:
        for lease in leases:
            lease.release()
