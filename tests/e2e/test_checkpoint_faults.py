"""Checkpoint faults in real jobs: each ends with the fingerprint of an uninterrupted run.

The jobs restart in place through torchrun (`launch.max_restarts`), and the restarted workers
restore through trainctl.runtime: only committed, verified steps are ever loaded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BUCKET, S3
from tests.e2e.harness import (
    assert_no_leftovers,
    events,
    launch,
    read_state,
    start_launch,
    trainctl,
    wait_for_event,
    worker_pid,
    write_recipe,
)

pytestmark = pytest.mark.e2e


def finish(proc, job: str, timeout_s: float = 200) -> int:  # type: ignore[no-untyped-def]
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers(job)


def uninterrupted_fingerprint(
    tmp_path: Path,
    storage: Path,
    steps: int,
    env: dict[str, str] | None = None,
    **sections: object,
) -> str:
    recipe = write_recipe(tmp_path, name="baseline", **sections)  # type: ignore[arg-type]
    result = launch(
        str(recipe), "--max-steps", str(steps), job_id="baseline", storage=storage, **(env or {})
    )
    assert result.returncode == 0, result.stderr
    return str(read_state(storage, "baseline")["fingerprint"])


def test_corrupt_shard_is_reported_and_restore_falls_back(tmp_path: Path, storage: Path) -> None:
    steps = 24
    sections = {"launch": {"max_restarts": 1}, "config": {"step_sleep_s": 0.3}}
    expected = uninterrupted_fingerprint(tmp_path, storage, steps, **sections)
    recipe = write_recipe(tmp_path, **sections)  # type: ignore[arg-type]
    job = "corrupt"
    proc = start_launch(str(recipe), "--max-steps", str(steps), job_id=job, storage=storage)
    wait_for_event(storage, job, "checkpoint_committed", step=15)
    shard = storage / "checkpoints" / job / "step-000000015" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle: same size, bad bytes
    shard.write_bytes(bytes(data))
    verify = trainctl("ckpt", "verify", job, "--step", "15", storage=storage)
    assert verify.returncode == 1, verify.stderr
    assert "__1_0.distcp" in verify.stderr + verify.stdout
    os.kill(worker_pid(job, 1), signal.SIGKILL)
    assert finish(proc, job) == 0, proc.stderr.read() if proc.stderr else ""
    state = read_state(storage, job)
    assert state["fingerprint"] == expected
    kinds = [(e["kind"], e["data"].get("step")) for e in events(storage, job)]
    assert ("restore_skipped", 15) in kinds
    assert ("checkpoint_restored", 10) in kinds


def test_worker_killed_mid_upload_partial_step_ignored_then_collected(
    tmp_path: Path, storage: Path, s3: S3
) -> None:
    steps = 20
    ckpt = {"storage": f"s3://{BUCKET}/ckpt", "part_size_mb": 5, "concurrency": 2}
    sections = {
        "launch": {"max_restarts": 1},
        "config": {"step_sleep_s": 0.2, "dim": 256, "layers": 4},
        "checkpoint": ckpt,
    }
    expected = uninterrupted_fingerprint(tmp_path, storage, steps, s3.env(), **sections)
    recipe = write_recipe(tmp_path, **sections)  # type: ignore[arg-type]
    job = "midupload"
    proc = start_launch(
        str(recipe), "--max-steps", str(steps), job_id=job, storage=storage, **s3.env()
    )
    wait_for_event(storage, job, "checkpoint_committed", step=5)
    # Slow the endpoint's path to a crawl by cutting it right as step 10's upload starts,
    # then kill a worker while step 10 is still uncommitted.
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3.direct_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        keys = [
            o["Key"]
            for o in client.list_objects_v2(
                Bucket=BUCKET, Prefix=f"ckpt/{job}/step-000000010/"
            ).get("Contents", [])
        ]
        uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if keys or uploads:
            break
        time.sleep(0.02)
    os.kill(worker_pid(job, 1), signal.SIGKILL)
    assert finish(proc, job) == 0, proc.stderr.read() if proc.stderr else ""
    assert read_state(storage, job)["fingerprint"] == expected
    kinds = [(e["kind"], e["data"].get("step")) for e in events(storage, job)]
    restored = [step for kind, step in kinds if kind == "checkpoint_restored"]
    assert restored and restored[0] in (5, 10)
    if restored[0] == 5:  # the kill landed before step 10 committed: it was skipped as partial
        assert ("restore_skipped", 10) in kinds or ("checkpoint_restored", 5) in kinds
    remaining = trainctl("ckpt", "ls", job, "--json", storage=storage, **s3.env()).json()["steps"]
    assert all(s["committed"] for s in remaining), remaining  # leftovers were collected
    assert not client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_storage_outage_fails_a_save_cleanly_and_a_later_one_commits(
    tmp_path: Path, storage: Path, s3: S3
) -> None:
    steps = 45
    sections = {
        "config": {"step_sleep_s": 1.0},
        "checkpoint": {"storage": f"s3://{BUCKET}/ckpt", "interval_steps": 5},
    }
    recipe = write_recipe(tmp_path, **sections)  # type: ignore[arg-type]
    job = "outage"
    proc = start_launch(
        str(recipe), "--max-steps", str(steps), job_id=job, storage=storage, **s3.env()
    )
    wait_for_event(storage, job, "checkpoint_committed", step=5)
    s3.proxy.down()
    failed = wait_for_event(storage, job, "checkpoint_failed", timeout_s=60)
    time.sleep(max(0.0, 30 - (time.time() - failed["time"])))
    s3.proxy.up()
    assert finish(proc, job, timeout_s=240) == 0, proc.stderr.read() if proc.stderr else ""
    state = read_state(storage, job)
    assert state["state"] == "succeeded" and state["final_step"] == steps
    kinds = [(e["kind"], e["data"].get("step")) for e in events(storage, job)]
    committed_after = [
        s for k, s in kinds if k == "checkpoint_committed" and s > failed["data"]["step"]
    ]
    assert committed_after, kinds
    listing = trainctl("ckpt", "ls", job, "--json", storage=storage, **s3.env()).json()["steps"]
    assert listing and all(s["committed"] for s in listing)
    assert json.dumps(listing)  # the listing is plain JSON
