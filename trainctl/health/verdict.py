"""Pure health verdicts: readings in, `HealthVerdict(status, reason, evidence)` out.

No I/O, no clock, no NVML import: every function here is a function of its arguments, so the
tables in tests/health/test_verdict.py pin each rule. The statuses mean:

- `OK`: nothing wrong that we know of.
- `DEGRADED`: keep running, warn (slow clocks, lifetime ECC history, a straggler).
- `UNHEALTHY`: exclude this node (lost GPU, fatal XID, uncorrectable ECC, NVML failing on a
  GPU machine, no disk space, rendezvous unreachable).

Several verdicts combine by *worst-of*: the combined status is the worst part's status, the
reason names every part at that status, and the evidence keeps every part.

NVML return codes and XID numbers appear here as plain integers: they are a stable driver ABI,
and keeping pynvml out keeps this module importable (and testable) everywhere.
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
    GpuReading,
    HostReading,
    MemoryReading,
    NvmlReading,
    NvmlStatus,
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


# --- GPU ---------------------------------------------------------------------------------------

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16

XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remap recorded",
    64: "ECC page retirement or row remap recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}

FATAL_XIDS = frozenset({48, 61, 62, 64, 74, 79, 95, 119, 120, 140})
"""Hardware or driver faults after which the GPU needs a reset or service: exclude the node."""
APPLICATION_XIDS = frozenset({13, 31, 43, 45})
"""Raised by a faulting application (bad address, killed kernel), not by the GPU: noted only."""

RECOVERY_ACTIONS: dict[int, str] = {
    0: "none",
    1: "GPU reset",
    2: "node reboot",
    3: "drain peer-to-peer traffic",
    4: "drain and reset",
    5: "recover the IMEX domain",
    6: "bus reset",
    7: "system reboot",
}

CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
SLOWDOWN_CLOCK_REASONS = 0x8 | 0x20 | 0x40 | 0x80
"""Throttling that means a hardware problem (heat, power brake), not a setting or idleness."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuPolicy:
    """Which GPU findings count as what. The defaults follow NVIDIA's XID catalogue."""

    fatal_xids: frozenset[int] = FATAL_XIDS
    """XIDs that make a GPU UNHEALTHY. Any other XID not in `application_xids` is DEGRADED."""
    application_xids: frozenset[int] = APPLICATION_XIDS
    """XIDs caused by the application, recorded in the evidence but not held against the GPU."""
    expected_num_gpus: int | None = None
    """If set, fewer GPUs than this is UNHEALTHY (a GPU gone from the bus is not enumerated)."""


def decode_clock_reasons(mask: int) -> list[str]:
    """Names of the bits set in a clock event (throttle) reasons mask; unknown bits as hex."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    if unknown:
        names.append(hex(unknown))
    return names


def _describe_xid(xid: int) -> str:
    meaning = XID_MEANINGS.get(xid)
    return f"XID {xid} ({meaning})" if meaning else f"XID {xid}"


def _gpu_findings(gpu: GpuReading, policy: GpuPolicy) -> list[tuple[Verdict, str]]:
    """Every rule that fires on one GPU, as (status, reason). Empty: nothing wrong."""
    findings: list[tuple[Verdict, str]] = []
    # One failure usually repeats on every query (a dead GPU): report each distinct failure
    # once, naming the queries it hit.
    probes_by_failure: dict[tuple[int | None, str], list[str]] = {}
    for error in gpu.errors:
        probes_by_failure.setdefault((error.code, error.message), []).append(error.probe)
    for (code, message), probes in probes_by_failure.items():
        where = ", ".join(probes)
        if code == NVML_ERROR_GPU_IS_LOST:
            reason = f"GPU is lost (fell off the bus): NVML said so on {where}"
        elif code == NVML_ERROR_RESET_REQUIRED:
            reason = f"GPU requires a reset: NVML said so on {where}"
        else:
            # Fail closed: on a machine with GPUs, a query we cannot answer is a fault.
            reason = f"NVML error on {where}: {message} (code {code})"
        findings.append((Verdict.UNHEALTHY, reason))

    fatal = [xid for xid in gpu.xid_events if xid in policy.fatal_xids]
    other = [
        xid
        for xid in gpu.xid_events
        if xid not in policy.fatal_xids and xid not in policy.application_xids
    ]
    if fatal:
        findings.append((Verdict.UNHEALTHY, ", ".join(_describe_xid(xid) for xid in fatal)))
    if other:
        findings.append((Verdict.DEGRADED, ", ".join(_describe_xid(xid) for xid in other)))

    if gpu.recovery_action:
        action = RECOVERY_ACTIONS.get(gpu.recovery_action, f"action {gpu.recovery_action}")
        findings.append((Verdict.UNHEALTHY, f"driver recommends recovery: {action}"))

    if gpu.ecc_uncorrected_volatile:
        findings.append(
            (
                Verdict.UNHEALTHY,
                f"{gpu.ecc_uncorrected_volatile} uncorrectable (double-bit) ECC errors "
                "since the driver loaded",
            )
        )
    elif gpu.ecc_uncorrected_aggregate:
        findings.append(
            (
                Verdict.DEGRADED,
                f"{gpu.ecc_uncorrected_aggregate} uncorrectable ECC errors in the GPU's lifetime "
                "(none since the driver loaded)",
            )
        )

    if gpu.retired_pages_pending:
        findings.append((Verdict.UNHEALTHY, "retired pages pending: reset the GPU to retire them"))
    if gpu.row_remap_failed:
        findings.append(
            (Verdict.UNHEALTHY, "row remapping failed: no spare rows, GPU needs service")
        )
    elif gpu.row_remap_pending:
        # A remap after an uncorrectable error means the bad row is still live until reset.
        if gpu.remapped_rows_uncorrected:
            findings.append(
                (
                    Verdict.UNHEALTHY,
                    f"row remap pending after {gpu.remapped_rows_uncorrected} uncorrectable "
                    "row errors: reset the GPU",
                )
            )
        else:
            findings.append((Verdict.DEGRADED, "row remap pending: reset the GPU when convenient"))

    if (
        gpu.temperature_c is not None
        and gpu.slowdown_threshold_c is not None
        and gpu.temperature_c >= gpu.slowdown_threshold_c
    ):
        findings.append(
            (
                Verdict.DEGRADED,
                f"thermal slowdown: {gpu.temperature_c} °C ≥ slowdown threshold "
                f"{gpu.slowdown_threshold_c} °C",
            )
        )
    if gpu.clock_event_reasons is not None and gpu.clock_event_reasons & SLOWDOWN_CLOCK_REASONS:
        names = decode_clock_reasons(gpu.clock_event_reasons & SLOWDOWN_CLOCK_REASONS)
        findings.append((Verdict.DEGRADED, "clocks throttled: " + ", ".join(names)))
    return findings


def gpu_verdict(gpu: GpuReading, policy: GpuPolicy | None = None) -> HealthVerdict:
    """Judge one GPU reading.

    UNHEALTHY: any NVML error on the GPU (lost, reset required, or another failed query:
    fail-closed), a fatal XID, a recovery action other than none, volatile uncorrectable ECC,
    retired pages pending, row remap failed, or a remap pending after uncorrectable errors.
    DEGRADED: other non-application XIDs, lifetime-only uncorrectable ECC, a remap pending
    after correctable errors only, temperature at/over the slowdown threshold, hardware or
    thermal clock throttling. Queries the driver does not support are listed, not held
    against the GPU. The reason lists every finding, worst first; the evidence holds the
    reading, decoded clock reasons and XID meanings.
    """
    policy = policy or GpuPolicy()
    findings = sorted(_gpu_findings(gpu, policy), key=lambda item: -item[0].severity)
    evidence: dict[str, Any] = {"reading": gpu.to_dict()}
    if gpu.clock_event_reasons is not None:
        evidence["clock_event_reasons"] = decode_clock_reasons(gpu.clock_event_reasons)
    if gpu.xid_events:
        evidence["xids"] = {str(xid): XID_MEANINGS.get(xid, "unknown") for xid in gpu.xid_events}
    if gpu.not_supported:
        evidence["not_available"] = list(gpu.not_supported)
    if not findings:
        noted = [xid for xid in gpu.xid_events if xid in policy.application_xids]
        reason = (
            "OK"
            if not noted
            else "OK (application XIDs only: "
            + ", ".join(_describe_xid(xid) for xid in noted)
            + ")"
        )
        return HealthVerdict(Verdict.OK, reason, evidence)
    evidence["findings"] = [{"status": s.value, "reason": r} for s, r in findings]
    return HealthVerdict(findings[0][0], "; ".join(reason for _, reason in findings), evidence)


def nvml_verdict(
    reading: NvmlReading, *, require_nvml: bool = False, policy: GpuPolicy | None = None
) -> HealthVerdict:
    """Judge everything NVML reported about this machine.

    - Library missing: OK with "NVML unavailable: no GPU probes" (fail-open: a CPU machine),
      unless `require_nvml` (a GPU node whose driver is gone), then UNHEALTHY.
    - NVML present but failing (init error such as driver not loaded): UNHEALTHY (fail-closed).
    - No GPUs: OK, unless `require_nvml` or `policy.expected_num_gpus` asks for some.
    - Otherwise the worst of the per-GPU verdicts, under subjects ``gpu<index>``.
    """
    policy = policy or GpuPolicy()
    evidence: dict[str, Any] = {"nvml": reading.to_dict()}
    if reading.status is NvmlStatus.LIBRARY_MISSING:
        if require_nvml:
            return HealthVerdict(
                Verdict.UNHEALTHY, f"NVML required but missing: {reading.message}", evidence
            )
        return HealthVerdict(Verdict.OK, reading.message, evidence)
    if reading.status is NvmlStatus.FAILED:
        return HealthVerdict(Verdict.UNHEALTHY, reading.message, evidence)

    num_gpus = len(reading.gpus)
    expected = policy.expected_num_gpus
    if expected is not None and num_gpus < expected:
        return HealthVerdict(
            Verdict.UNHEALTHY, f"NVML sees {num_gpus} GPUs, expected {expected}", evidence
        )
    if num_gpus == 0:
        status = Verdict.UNHEALTHY if require_nvml else Verdict.OK
        return HealthVerdict(status, "NVML reports no GPUs on this machine", evidence)

    per_gpu = {f"gpu{gpu.index}": gpu_verdict(gpu, policy) for gpu in reading.gpus}
    combined = worst_of(per_gpu)
    if combined.status is Verdict.OK:
        reason = f"{num_gpus} GPUs OK (driver {reading.driver_version})"
        return HealthVerdict(Verdict.OK, reason, combined.evidence)
    return combined


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


def node_verdict(
    nvml: NvmlReading | None,
    host: HostReading | None,
    *,
    require_nvml: bool = False,
    gpu_policy: GpuPolicy | None = None,
    host_policy: HostPolicy | None = None,
) -> HealthVerdict:
    """The verdict on one node: worst of ``gpus`` (NVML) and ``host``. Either may be None
    (not probed). This is what the gate returns and what goes into ``nodes/<node>.json``."""
    parts: dict[str, HealthVerdict] = {}
    if nvml is not None:
        parts["gpus"] = nvml_verdict(nvml, require_nvml=require_nvml, policy=gpu_policy)
    if host is not None:
        parts["host"] = host_verdict(host, host_policy)
    return worst_of(parts)


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
