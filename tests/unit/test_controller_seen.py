"""A job whose controller stopped renewing its lease shows as `running?`, with how long ago it
was last heard from (status, list, and their JSON); a renewing one shows plainly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.e2e.harness import trainctl
from trainctl.lease import Lease, controller_seen
from trainctl.recipe import load_recipe, spec_to_yaml
from trainctl.recovery.journal import new_record
from trainctl.state import JobState
from trainctl.store import JobStore

REPO = Path(__file__).resolve().parents[2]


def running_job(store: JobStore, job_id: str) -> None:
    spec = load_recipe(REPO / "recipes" / "tiny-gpt.yaml")
    record = new_record(job_id, spec, time.time())
    record.move(JobState.RUNNING, "attempt 0 on 2 node(s)")
    store.create(record, spec_to_yaml(spec))


def write_lease(store: JobStore, job_id: str, renewed_at: float, host: str) -> None:
    document = {
        "host": host,
        "pid": 4242,
        "started": 1,
        "holder_id": "h",
        "renewed_at": renewed_at,
        "ttl_s": 30.0,
        "released": False,
    }
    path = Path(store.job_url(job_id)) / "lease.json"
    path.write_text(json.dumps(document))


def test_a_silent_controller_makes_the_job_running_questioned(storage: Path) -> None:
    store = JobStore(str(storage))
    running_job(store, "quiet")
    write_lease(store, "quiet", time.time() - 13 * 60, "gpu-host-7")  # 13 minutes silent
    running_job(store, "busy")
    lease = Lease(store, "busy", ttl_s=30)
    lease.acquire()  # this process renews it: alive
    try:
        seen = controller_seen(store, "quiet")
        assert not seen.alive and seen.last_heard_s is not None and seen.last_heard_s > 700
        assert seen.describe() == "controller pid 4242 on gpu-host-7, last heard 13m ago"
        assert controller_seen(store, "busy").alive

        status = trainctl("status", "quiet", storage=storage, NO_COLOR="1", COLUMNS="100")
        assert "running?" in status.stdout
        assert "last heard 13m ago: it may be gone" in status.stdout
        shown = trainctl("status", "quiet", "--json", storage=storage).json()
        assert shown["controller"]["alive"] is False and shown["controller"]["last_heard_s"] > 700
        assert trainctl("status", "busy", "--json", storage=storage).json()["controller"]["alive"]

        listed = trainctl("list", storage=storage, NO_COLOR="1", COLUMNS="100").stdout
        rows = {line.split()[0]: line.split()[2] for line in listed.splitlines()[1:] if line}
        assert rows["quiet"] == "running?" and rows["busy"] == "running"
        as_json = {j["job_id"]: j for j in trainctl("list", "--json", storage=storage).json()}
        assert as_json["quiet"]["controller_alive"] is False
        assert as_json["busy"]["controller_alive"] is True
    finally:
        lease.release()


def test_a_controller_gone_from_this_host_is_silent_at_once(storage: Path) -> None:
    store = JobStore(str(storage))
    running_job(store, "crashed")
    write_lease(store, "crashed", time.time(), os.uname().nodename)  # pid 4242: not ours
    assert not controller_seen(store, "crashed").alive
