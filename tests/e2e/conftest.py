"""e2e fixtures: a real S3 endpoint (moto server on 127.0.0.1, port 0) behind an outage proxy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

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
