"""The pre-rendezvous health gate a node agent runs before joining, and again while running.

    result = preflight(GateConfig(paths=(ckpt_dir, log_dir), rendezvous=("head", 29400)))
    store.write_node_verdict(job_id, result.record(node, phase="preflight").to_dict())
    if result.verdict.status is Verdict.UNHEALTHY:
        ...  # do not join; the controller excludes this node

For periodic probes during the run keep one `NodeProber` per agent process: it keeps NVML
and its XID event set open, so XIDs raised between probes are seen.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from trainctl.health.gpu_verdict import GpuPolicy, node_verdict
from trainctl.health.host import local_path, probe_host
from trainctl.health.nvml import NvmlProbe
from trainctl.health.readings import HostReading, NvmlReading
from trainctl.health.verdict import GIB, HealthVerdict, HostPolicy, NodeVerdictRecord


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateConfig:
    """What the gate checks and the limits it applies."""

    paths: tuple[str, ...] = ()
    """Checkpoint and log directories needing free space: plain paths or ``file://`` URLs.
    Object-store URLs (``s3://``) have no disk to measure and are listed as skipped."""
    min_free_disk_bytes: int = GIB
    """Free space each path's filesystem must have."""
    min_available_memory_bytes: int = 0
    """Available host memory required (0: report only)."""
    rendezvous: tuple[str, int] | None = None
    """(host, port) of the rendezvous endpoint to test with a TCP connect; None: skip."""
    connect_timeout_s: float = 2.0
    """How long the rendezvous connect may take."""
    require_nvml: bool = False
    """True on GPU nodes: a missing NVML library or no GPUs is then UNHEALTHY, not fail-open."""
    expected_num_gpus: int | None = None
    """If set, fewer visible GPUs is UNHEALTHY (a GPU off the bus may not be enumerated)."""
    xid_wait_ms: int = 0
    """How long each probe waits for an XID event (0: take only what is pending)."""

    @property
    def gpu_policy(self) -> GpuPolicy:
        """The GPU policy these settings imply."""
        return GpuPolicy(expected_num_gpus=self.expected_num_gpus)

    @property
    def host_policy(self) -> HostPolicy:
        """The host policy these settings imply."""
        return HostPolicy(
            min_free_disk_bytes=self.min_free_disk_bytes,
            min_available_memory_bytes=self.min_available_memory_bytes,
        )


@dataclasses.dataclass(frozen=True)
class GateResult:
    """A node's verdict, the readings behind it, and when it was taken."""

    verdict: HealthVerdict
    nvml: NvmlReading
    host: HostReading
    checked_at: float
    """Unix time of the probe."""
    skipped_paths: tuple[str, ...] = ()
    """Configured paths with no local disk to measure (object-store URLs)."""

    def record(self, node: str, *, phase: str = "preflight") -> NodeVerdictRecord:
        """The ``nodes/<node>.json`` document for this result."""
        verdict = self.verdict
        if self.skipped_paths:
            evidence = verdict.evidence | {"skipped_paths": list(self.skipped_paths)}
            verdict = dataclasses.replace(verdict, evidence=evidence)
        return NodeVerdictRecord(node, phase, self.checked_at, verdict)

    def to_dict(self) -> dict[str, Any]:
        """Verdict fields plus the raw readings and time, JSON-serialisable."""
        return self.verdict.to_dict() | {
            "checked_at": self.checked_at,
            "readings": {"nvml": self.nvml.to_dict(), "host": self.host.to_dict()},
            "skipped_paths": list(self.skipped_paths),
        }


def judge(nvml: NvmlReading, host: HostReading, config: GateConfig) -> HealthVerdict:
    """The node verdict for these readings under `config`'s limits (pure)."""
    return node_verdict(
        nvml,
        host,
        require_nvml=config.require_nvml,
        gpu_policy=config.gpu_policy,
        host_policy=config.host_policy,
    )


class NodeProber:
    """Runs the gate's probes repeatedly, keeping NVML open between probes.

    `probe()` never raises for a probed condition: NVML or host failures are in the result.
    Call `close()` (or use it as a context manager) when the agent exits.
    """

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._nvml = NvmlProbe(xid_wait_ms=config.xid_wait_ms)

    def __enter__(self) -> NodeProber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def probe(self) -> GateResult:
        """Probe GPUs and host now; blocks up to `xid_wait_ms` + `connect_timeout_s`."""
        local = [(path, local_path(path)) for path in self.config.paths]
        nvml = self._nvml.read()
        host = probe_host(
            [resolved for _, resolved in local if resolved is not None],
            endpoint=self.config.rendezvous,
            connect_timeout_s=self.config.connect_timeout_s,
        )
        return GateResult(
            verdict=judge(nvml, host, self.config),
            nvml=nvml,
            host=host,
            checked_at=time.time(),
            skipped_paths=tuple(path for path, resolved in local if resolved is None),
        )

    def close(self) -> None:
        """Release NVML."""
        self._nvml.close()


def preflight(config: GateConfig) -> GateResult:
    """One-shot gate: probe GPUs and host, judge, release NVML.

    `result.verdict.status is Verdict.UNHEALTHY` means: do not join the rendezvous.
    """
    with NodeProber(config) as prober:
        return prober.probe()
