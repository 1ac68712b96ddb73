"""Fixtures shared by the whole suite: a sealed CLI environment, a storage root, and a real S3
endpoint (a moto server on 127.0.0.1, an OS-chosen port) started once per session and reset
(POST /moto-api/reset) before every test that uses it, the way s3fs's own test suite does it.
Credentials and the endpoint reach the code under test both explicitly (`storage_options`)
and through the standard AWS environment variables, because the runtime relies on the latter.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def sealed_env(storage: Path | str, **extra: str) -> dict[str, str]:
    """The environment CLI tests run in: no colour, fixed width, a temp storage root and HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "TORCHELASTIC_"))}
    env.update(
        NO_COLOR="1",
        COLUMNS="80",
        TERM="dumb",
        TRAINCTL_STORAGE=str(storage),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def python() -> str:
    return sys.executable


BUCKET = "trainctl-test"


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 endpoint and how to reach it."""

    url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.url, "key": "testing", "secret": "testing"}

    def root(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, an OS-chosen port, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """A freshly reset endpoint with one empty bucket; AWS_* variables point at it."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
    }.items():
        monkeypatch.setenv(name, value)
    endpoint = S3Endpoint(url=moto_server, bucket=BUCKET)
    endpoint.client().create_bucket(Bucket=BUCKET)
    return endpoint
