"""Pure GPU verdicts (NVML readings in, `HealthVerdict` out) and the whole node's verdict.

NVML return codes and XID numbers appear here as plain integers: they are a stable driver ABI,
and keeping pynvml out keeps this module importable (and testable) everywhere. The statuses
and how verdicts combine are defined in `trainctl.health.verdict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainctl.health.readings import GpuReading, HostReading, NvmlReading, NvmlStatus
from trainctl.health.verdict import HealthVerdict, HostPolicy, Verdict, host_verdict, worst_of

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
