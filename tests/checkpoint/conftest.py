"""Fixtures for the checkpoint tests: each storage backend (the S3 endpoint is the session's
moto server, `tests/conftest.py`)."""

from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.fixture(params=["file", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """A checkpoint root on each backend: (root URL, storage_options)."""
    if request.param == "file":
        return f"file://{tmp_path}/ckpt", {}
    endpoint = request.getfixturevalue("s3")
    return endpoint.root("prefix/ckpt"), endpoint.storage_options


@pytest.fixture(autouse=True)
def _quiet_torch_threads() -> None:
    # Two cores shared with other engineers: keep intra-op parallelism from oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
