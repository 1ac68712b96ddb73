"""`--storage s3://...` puts the job store and the checkpoints on object storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import BUCKET, S3
from tests.e2e.harness import launch, trainctl, write_recipe

pytestmark = pytest.mark.e2e


def test_job_store_and_checkpoints_on_s3(tmp_path: Path, s3: S3) -> None:
    root = f"s3://{BUCKET}/trainctl"
    recipe = write_recipe(tmp_path, checkpoint={"interval_steps": 4})
    env = {**s3.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = launch(
        str(recipe), "--max-steps", "8", "--storage", root, job_id="on-s3", storage=root, **env
    )
    assert result.returncode == 0, result.stderr
    status = trainctl("status", "on-s3", "--json", storage=root, **env).json()
    assert status["state"] == "succeeded" and status["final_step"] == 8
    listing = trainctl("list", "--json", storage=root, **env).json()
    assert [job["job_id"] for job in listing] == ["on-s3"]
    kinds = [e["kind"] for e in trainctl("events", "on-s3", "--json", storage=root, **env).json()]
    assert "checkpoint_committed" in kinds and kinds[-1] == "job_succeeded"
    steps = trainctl("ckpt", "ls", "on-s3", "--json", storage=root, **env).json()["steps"]
    assert [s["step"] for s in steps if s["committed"]] == [4, 8]
    verify = trainctl("ckpt", "verify", "on-s3", storage=root, **env)
    assert verify.returncode == 0, verify.stderr
    # the node logs were copied up next to the state
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3.direct_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    keys = {
        o["Key"]
        for o in client.list_objects_v2(Bucket=BUCKET, Prefix="trainctl/jobs/on-s3/")["Contents"]
    }
    assert {
        "trainctl/jobs/on-s3/state.json",
        "trainctl/jobs/on-s3/spec.yaml",
        "trainctl/jobs/on-s3/logs/node-0.log",
    } <= keys
