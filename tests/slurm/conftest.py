"""A real Slurm cluster (munged, slurmctld, slurmd n1..n4 on localhost) for the whole session.

Without the Slurm and munge programs the tests skip and say how to install them — unless
`TRAINCTL_REQUIRE_SLURM=1` (CI sets it), where a missing Slurm fails the run instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import (
    INSTALL_HINT,
    LocalSlurmCluster,
    local_slurm_cluster,
    missing_binaries,
)
from trainctl.launch.slurm import SlurmClient


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    missing = missing_binaries()
    if missing:
        reason = f"Slurm is not installed (missing {', '.join(missing)}); install: {INSTALL_HINT}"
        if os.environ.get("TRAINCTL_REQUIRE_SLURM") == "1":
            pytest.fail(f"TRAINCTL_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    if os.geteuid() != 0:
        reason = "the local Slurm cluster runs its daemons as root"
        if os.environ.get("TRAINCTL_REQUIRE_SLURM") == "1":
            pytest.fail(f"TRAINCTL_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    # A short root: the munge socket path must stay under the 108-byte limit of AF_UNIX.
    root = Path(tempfile.mkdtemp(prefix="trainctl-slurm-"))
    try:
        with local_slurm_cluster(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster: LocalSlurmCluster) -> Iterator[SlurmClient]:
    """A client of the session's cluster; afterwards no job, job process or drained node is
    left (the test fails if its jobs do not go)."""
    client = SlurmClient(env={"SLURM_CONF": str(slurm_cluster.conf)}, timeout_s=20)
    yield client
    for job in slurm_cluster.active_jobs():
        slurm_cluster.run("scancel", job, check=False)
    for node in slurm_cluster.nodes:
        if "DRAIN" in client.node_state(node):
            client.resume_node(node)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not slurm_cluster.active_jobs() and not slurm_cluster.job_processes():
            break
        time.sleep(0.1)
    assert not slurm_cluster.active_jobs(), "Slurm jobs left behind"
    assert not slurm_cluster.job_processes(), "job processes left behind"
