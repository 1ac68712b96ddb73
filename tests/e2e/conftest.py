"""e2e fixtures: a real S3 endpoint (moto server on 127.0.0.1, port 0) behind an outage proxy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import SLOW, final_loss, launch, write_recipe
from tests.e2e.s3proxy import OutageProxy

BUCKET = "e2e"


@dataclass
class S3:
    proxy: OutageProxy
    direct_url: str

    @property
    def url(self) -> str:
        return self.proxy.url

    def env(self) -> dict[str, str]:
        """The standard AWS variables that s3fs/botocore read (the job reaches S3 via the proxy)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=direct,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    proxy = OutageProxy(host, int(port))
    try:
        yield S3(proxy, direct)
    finally:
        proxy.close()
        server.stop()


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 2-node run every recovery test compares with: fingerprint and final
    loss (same recipe, same seed). One per session, shared by the recovery suites."""
    directory: Path = tmp_path_factory.mktemp("baseline")
    storage = directory / "store"
    storage.mkdir()
    recipe = write_recipe(directory, "gpt", config={**SLOW})
    result = launch(str(recipe), "--json", job_id="baseline", storage=storage)
    assert result.returncode == 0, result.stderr
    return {"fingerprint": result.json()["fingerprint"], "loss": final_loss(storage, "baseline")}
