"""Pure health verdicts: readings in, `HealthVerdict(status, reason, evidence)` out.

No I/O, no clock, no NVML import: every function here is a function of its arguments, so the
tables in tests/health/test_verdict.py pin each rule. The statuses mean:

- `OK`: nothing wrong that we know of.
- `DEGRADED`: keep running, warn (slow clocks, lifetime ECC history, a straggler).
- `UNHEALTHY`: exclude this node (lost GPU, fatal XID, uncorrectable ECC, NVML failing on a
  GPU machine, no disk space, rendezvous unreachable).

Several verdicts combine by *worst-of*: the combined status is the worst part's status, the
reason names every part at that status, and the evidence keeps every part.

GPU verdicts (NVML readings) and the whole node's verdict are in `trainctl.health.gpu_verdict`.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainctl.health.readings import (
    BandwidthReading,
    DiskReading,
    EndpointReading,
    HostReading,
    MemoryReading,
)


class Verdict(str, enum.Enum):
    """How healthy a GPU, host or node is; ordered OK < DEGRADED < UNHEALTHY."""

    OK = "OK"
    """Nothing wrong that the probes can see."""
    DEGRADED = "DEGRADED"
    """Keep running, but warn: the node works, slower or with a history of faults."""
    UNHEALTHY = "UNHEALTHY"
    """Exclude the node: it must not join (or stay in) the job."""

    @property
    def severity(self) -> int:
        """0, 1, 2 for OK, DEGRADED, UNHEALTHY: what worst-of compares."""
        return _SEVERITY[self]


_SEVERITY = {Verdict.OK: 0, Verdict.DEGRADED: 1, Verdict.UNHEALTHY: 2}


@dataclasses.dataclass(frozen=True)
class HealthVerdict:
    """A status, one sentence saying why, and the numbers behind it (JSON-serialisable)."""

    status: Verdict
    reason: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"status": "OK", "reason": ..., "evidence": {...}}``."""
        return {"status": self.status.value, "reason": self.reason, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HealthVerdict:
        """Inverse of `to_dict`. Raises ValueError naming the bad field."""
        try:
            status = Verdict(data["status"])
        except (KeyError, ValueError) as bad:
            raise ValueError(f"status: expected one of OK, DEGRADED, UNHEALTHY ({bad})") from bad
        reason = data.get("reason", "")
        evidence = data.get("evidence", {})
        if not isinstance(reason, str):
            raise ValueError(f"reason: expected a string, got {type(reason).__name__}")
        if not isinstance(evidence, dict):
            raise ValueError(f"evidence: expected an object, got {type(evidence).__name__}")
        return cls(status, reason, evidence)


def worst_of(
    parts: Mapping[str, HealthVerdict], *, empty_reason: str = "nothing checked"
) -> HealthVerdict:
    """Combine named verdicts: the worst status wins; its reason names each part at that status.

    `parts` maps a subject (``gpu3``, ``host``, ``disk /ckpt``) to its verdict. The evidence of
    the result maps every subject to its full verdict dict, so nothing is lost. With no parts
    the result is OK with `empty_reason`.
    """
    if not parts:
        return HealthVerdict(Verdict.OK, empty_reason, {})
    worst = max((verdict.status for verdict in parts.values()), key=lambda status: status.severity)
    reasons = [f"{subject}: {v.reason}" for subject, v in parts.items() if v.status is worst]
    evidence = {subject: verdict.to_dict() for subject, verdict in parts.items()}
    return HealthVerdict(worst, "; ".join(reasons), evidence)


# --- host --------------------------------------------------------------------------------------

GIB = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostPolicy:
    """Minimums the host must meet."""

    min_free_disk_bytes: int = GIB
    """Free space required at every probed path (checkpoint and log directories)."""
    min_available_memory_bytes: int = 0
    """Available memory required; 0 only reports it."""


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def disk_verdict(disk: DiskReading, policy: HostPolicy) -> HealthVerdict:
    """UNHEALTHY when the path cannot be measured or has less than the minimum free."""
    evidence = disk.to_dict() | {"min_free_bytes": policy.min_free_disk_bytes}
    if disk.error is not None or disk.free_bytes is None:
        message = disk.error.message if disk.error else "no reading"
        return HealthVerdict(Verdict.UNHEALTHY, f"cannot measure free space: {message}", evidence)
    if disk.free_bytes < policy.min_free_disk_bytes:
        reason = f"{_gib(disk.free_bytes)} free, need {_gib(policy.min_free_disk_bytes)}"
        return HealthVerdict(Verdict.UNHEALTHY, reason, evidence)
    return HealthVerdict(Verdict.OK, f"{_gib(disk.free_bytes)} free", evidence)


def memory_verdict(memory: MemoryReading, policy: HostPolicy) -> HealthVerdict:
    """Below the minimum: UNHEALTHY. Unreadable: UNHEALTHY if a minimum is set, else DEGRADED."""
    evidence = memory.to_dict() | {"min_available_bytes": policy.min_available_memory_bytes}
    if memory.error is not None or memory.available_bytes is None:
        message = memory.error.message if memory.error else "no reading"
        status = Verdict.UNHEALTHY if policy.min_available_memory_bytes else Verdict.DEGRADED
        return HealthVerdict(status, f"cannot read available memory: {message}", evidence)
    if memory.available_bytes < policy.min_available_memory_bytes:
        reason = (
            f"{_gib(memory.available_bytes)} memory available, "
            f"need {_gib(policy.min_available_memory_bytes)}"
        )
        return HealthVerdict(Verdict.UNHEALTHY, reason, evidence)
    return HealthVerdict(Verdict.OK, f"{_gib(memory.available_bytes)} available", evidence)


def endpoint_verdict(endpoint: EndpointReading) -> HealthVerdict:
    """UNHEALTHY when the rendezvous endpoint did not accept a TCP connection in time."""
    where = f"{endpoint.host}:{endpoint.port}"
    if not endpoint.connected:
        message = endpoint.error.message if endpoint.error else "no connection"
        reason = f"cannot reach rendezvous {where} within {endpoint.timeout_s:g} s: {message}"
        return HealthVerdict(Verdict.UNHEALTHY, reason, endpoint.to_dict())
    return HealthVerdict(Verdict.OK, f"rendezvous {where} reachable", endpoint.to_dict())


def host_verdict(host: HostReading, policy: HostPolicy | None = None) -> HealthVerdict:
    """Worst of the disk, memory and endpoint verdicts (subjects ``disk <path>``, ``memory``,
    ``rendezvous``); OK reason summarises what was checked."""
    policy = policy or HostPolicy()
    parts: dict[str, HealthVerdict] = {
        f"disk {disk.path}": disk_verdict(disk, policy) for disk in host.disks
    }
    if host.memory is not None:
        parts["memory"] = memory_verdict(host.memory, policy)
    if host.endpoint is not None:
        parts["rendezvous"] = endpoint_verdict(host.endpoint)
    return worst_of(parts, empty_reason="no host checks configured")


# --- all-reduce bandwidth -----------------------------------------------------------------------


def bandwidth_verdicts(
    readings: Iterable[BandwidthReading],
    *,
    min_bus_gb_per_s: float | None = None,
    min_fraction_of_median: float | None = 0.5,
) -> dict[int, HealthVerdict]:
    """Judge each rank's all-reduce bandwidth: DEGRADED below an absolute floor
    (`min_bus_gb_per_s`) or below `min_fraction_of_median` × the median over ranks.

    Returns rank → verdict for every reading; the evidence holds the rank's numbers, the
    median and the limits used.
    """
    readings = list(readings)
    if not readings:
        return {}
    median = statistics.median(r.bus_gb_per_s for r in readings)
    verdicts: dict[int, HealthVerdict] = {}
    for reading in readings:
        evidence = reading.to_dict() | {
            "median_bus_gb_per_s": median,
            "min_bus_gb_per_s": min_bus_gb_per_s,
            "min_fraction_of_median": min_fraction_of_median,
        }
        problems = []
        if min_bus_gb_per_s is not None and reading.bus_gb_per_s < min_bus_gb_per_s:
            problems.append(
                f"all-reduce bus bandwidth {reading.bus_gb_per_s:.2f} GB/s "
                f"< floor {min_bus_gb_per_s:.2f} GB/s"
            )
        if (
            min_fraction_of_median is not None
            and reading.bus_gb_per_s < min_fraction_of_median * median
        ):
            problems.append(
                f"all-reduce bus bandwidth {reading.bus_gb_per_s:.2f} GB/s "
                f"< {min_fraction_of_median:g} × median {median:.2f} GB/s"
            )
        if problems:
            verdicts[reading.rank] = HealthVerdict(Verdict.DEGRADED, "; ".join(problems), evidence)
        else:
            reason = f"all-reduce bus bandwidth {reading.bus_gb_per_s:.2f} GB/s"
            verdicts[reading.rank] = HealthVerdict(Verdict.OK, reason, evidence)
    return verdicts


# --- the record in the job store --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeVerdictRecord:
    """The document at ``jobs/<job>/nodes/<node>.json``: a node's latest verdict."""

    node: str
    phase: str
    """When it was taken: ``preflight`` (before joining) or ``running`` (periodic probe)."""
    checked_at: float
    """Unix time of the probe (passed in: this module reads no clock)."""
    verdict: HealthVerdict

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON object: node, phase, checked_at, status, reason, evidence."""
        return {"node": self.node, "phase": self.phase, "checked_at": self.checked_at} | (
            self.verdict.to_dict()
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeVerdictRecord:
        """Inverse of `to_dict`. Raises ValueError naming the bad field."""
        node, phase, checked_at = data.get("node"), data.get("phase"), data.get("checked_at")
        if not isinstance(node, str):
            raise ValueError(f"node: expected a string, got {node!r}")
        if not isinstance(phase, str):
            raise ValueError(f"phase: expected a string, got {phase!r}")
        if not isinstance(checked_at, int | float):
            raise ValueError(f"checked_at: expected a number, got {checked_at!r}")
        return cls(node, phase, float(checked_at), HealthVerdict.from_dict(data))


def worst_status(statuses: Sequence[Verdict]) -> Verdict:
    """The worst of some statuses (OK when empty)."""
    return max(statuses, key=lambda status: status.severity, default=Verdict.OK)
