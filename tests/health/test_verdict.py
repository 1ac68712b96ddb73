"""Verdict tables: every reading combination the pure verdict handles, with its reason."""

from __future__ import annotations

import json

import pytest

from trainctl.health.gpu_verdict import (
    GpuPolicy,
    decode_clock_reasons,
    gpu_verdict,
    node_verdict,
    nvml_verdict,
)
from trainctl.health.readings import (
    BandwidthReading,
    DiskReading,
    EndpointReading,
    GpuReading,
    HostReading,
    MemoryReading,
    NvmlReading,
    NvmlStatus,
    ProbeError,
)
from trainctl.health.verdict import (
    GIB,
    HealthVerdict,
    HostPolicy,
    NodeVerdictRecord,
    Verdict,
    bandwidth_verdicts,
    host_verdict,
    worst_of,
    worst_status,
)

OK, DEGRADED, UNHEALTHY = Verdict.OK, Verdict.DEGRADED, Verdict.UNHEALTHY

HEALTHY = dict(
    ecc_uncorrected_volatile=0,
    ecc_uncorrected_aggregate=0,
    retired_pages_pending=False,
    row_remap_pending=False,
    row_remap_failed=False,
    remapped_rows_uncorrected=0,
    recovery_action=0,
    temperature_c=45,
    slowdown_threshold_c=90,
    clock_event_reasons=0,
)

GPU_TABLE = [
    ({}, OK, "OK"),
    (
        {"errors": (ProbeError("handle", 15, "GPU is lost"),)},
        UNHEALTHY,
        "GPU is lost (fell off the bus): NVML said so on handle",
    ),
    (
        {"errors": (ProbeError("name", 16, "GPU requires restart"),)},
        UNHEALTHY,
        "GPU requires a reset: NVML said so on name",
    ),
    (
        {"errors": (ProbeError("temperature", 999, "Unknown Error"),)},
        UNHEALTHY,
        "NVML error on temperature: Unknown Error (code 999)",
    ),
    (
        {
            "errors": (
                ProbeError("name", 999, "Unknown Error"),
                ProbeError("uuid", 999, "Unknown Error"),
            )
        },
        UNHEALTHY,
        "NVML error on name, uuid: Unknown Error (code 999)",
    ),
    ({"xid_events": (79,)}, UNHEALTHY, "XID 79 (GPU has fallen off the bus)"),
    (
        {"xid_events": (48, 94)},
        UNHEALTHY,
        "XID 48 (double-bit ECC error); XID 94 (contained ECC error)",
    ),
    ({"xid_events": (92,)}, DEGRADED, "XID 92 (high single-bit ECC error rate)"),
    ({"xid_events": (999,)}, DEGRADED, "XID 999"),
    (
        {"xid_events": (13, 31)},
        OK,
        "OK (application XIDs only: XID 13 (graphics engine exception), "
        "XID 31 (GPU memory page fault))",
    ),
    ({"recovery_action": 1}, UNHEALTHY, "driver recommends recovery: GPU reset"),
    ({"recovery_action": 3}, UNHEALTHY, "driver recommends recovery: drain peer-to-peer traffic"),
    ({"recovery_action": 42}, UNHEALTHY, "driver recommends recovery: action 42"),
    (
        {"ecc_uncorrected_volatile": 2, "ecc_uncorrected_aggregate": 5},
        UNHEALTHY,
        "2 uncorrectable (double-bit) ECC errors since the driver loaded",
    ),
    (
        {"ecc_uncorrected_aggregate": 5},
        DEGRADED,
        "5 uncorrectable ECC errors in the GPU's lifetime (none since the driver loaded)",
    ),
    (
        {"retired_pages_pending": True},
        UNHEALTHY,
        "retired pages pending: reset the GPU to retire them",
    ),
    (
        {"row_remap_failed": True, "row_remap_pending": True},
        UNHEALTHY,
        "row remapping failed: no spare rows, GPU needs service",
    ),
    (
        {"row_remap_pending": True, "remapped_rows_uncorrected": 1},
        UNHEALTHY,
        "row remap pending after 1 uncorrectable row errors: reset the GPU",
    ),
    ({"row_remap_pending": True}, DEGRADED, "row remap pending: reset the GPU when convenient"),
    ({"temperature_c": 90}, DEGRADED, "thermal slowdown: 90 °C ≥ slowdown threshold 90 °C"),
    ({"temperature_c": 89}, OK, "OK"),
    (
        {"clock_event_reasons": 0x20 | 0x80},
        DEGRADED,
        "clocks throttled: sw_thermal_slowdown, hw_power_brake_slowdown",
    ),
    ({"clock_event_reasons": 0x1 | 0x4 | 0x10}, OK, "OK"),  # idle, power cap, sync boost
    (
        {"temperature_c": 95, "xid_events": (79,)},
        UNHEALTHY,
        "XID 79 (GPU has fallen off the bus); thermal slowdown: 95 °C ≥ slowdown threshold 90 °C",
    ),
]


@pytest.mark.parametrize(("fields", "status", "reason"), GPU_TABLE)
def test_gpu_verdict_table(fields: dict, status: Verdict, reason: str) -> None:
    verdict = gpu_verdict(GpuReading(index=0, **(HEALTHY | fields)))
    assert (verdict.status, verdict.reason) == (status, reason)
    json.dumps(verdict.to_dict())  # evidence is always serialisable


def test_not_available_readings_are_ok_and_listed() -> None:
    reading = GpuReading(index=0, not_supported=("ecc.uncorrected.volatile", "remapped_rows"))
    verdict = gpu_verdict(reading)
    assert (verdict.status, verdict.reason) == (OK, "OK")
    assert verdict.evidence["not_available"] == ["ecc.uncorrected.volatile", "remapped_rows"]


def test_gpu_evidence_holds_reading_findings_and_decoded_reasons() -> None:
    reading = GpuReading(index=3, uuid="GPU-x", xid_events=(79,), clock_event_reasons=0x41)
    evidence = gpu_verdict(reading).evidence
    assert evidence["reading"]["uuid"] == "GPU-x"
    assert evidence["xids"] == {"79": "GPU has fallen off the bus"}
    assert evidence["clock_event_reasons"] == ["gpu_idle", "hw_thermal_slowdown"]
    assert evidence["findings"] == [
        {"status": "UNHEALTHY", "reason": "XID 79 (GPU has fallen off the bus)"},
        {"status": "DEGRADED", "reason": "clocks throttled: hw_thermal_slowdown"},
    ]


def test_policy_can_reclassify_xids() -> None:
    policy = GpuPolicy(fatal_xids=frozenset({92}), application_xids=frozenset())
    verdict = gpu_verdict(GpuReading(index=0, xid_events=(92, 13)), policy)
    assert (
        verdict.reason
        == "XID 92 (high single-bit ECC error rate); XID 13 (graphics engine exception)"
    )
    assert verdict.status is UNHEALTHY


def test_decode_clock_reasons_keeps_unknown_bits() -> None:
    assert decode_clock_reasons(0x40 | 0x10000) == ["hw_thermal_slowdown", "0x10000"]
    assert decode_clock_reasons(0) == []


MISSING = NvmlReading(
    NvmlStatus.LIBRARY_MISSING,
    "NVML unavailable: no GPU probes",
    error=ProbeError("init", 12, "NVML Shared Library Not Found"),
)
FAILED = NvmlReading(
    NvmlStatus.FAILED,
    "NVML failed (init): Driver Not Loaded (code 9)",
    error=ProbeError("init", 9, "Driver Not Loaded"),
)
NO_GPUS = NvmlReading(NvmlStatus.AVAILABLE, "NVML driver 550: 0 GPUs", driver_version="550")
TWO_GPUS = NvmlReading(
    NvmlStatus.AVAILABLE,
    "NVML driver 550: 2 GPUs",
    driver_version="550",
    gpus=(GpuReading(index=0, **HEALTHY), GpuReading(index=1, **HEALTHY)),
)
ONE_BAD = NvmlReading(
    NvmlStatus.AVAILABLE,
    "NVML driver 550: 2 GPUs",
    driver_version="550",
    gpus=(GpuReading(index=0, **HEALTHY), GpuReading(index=1, xid_events=(79,))),
)

NVML_TABLE = [
    (MISSING, False, None, OK, "NVML unavailable: no GPU probes"),
    (MISSING, True, None, UNHEALTHY, "NVML required but missing: NVML unavailable: no GPU probes"),
    (FAILED, False, None, UNHEALTHY, "NVML failed (init): Driver Not Loaded (code 9)"),
    (NO_GPUS, False, None, OK, "NVML reports no GPUs on this machine"),
    (NO_GPUS, True, None, UNHEALTHY, "NVML reports no GPUs on this machine"),
    (TWO_GPUS, False, None, OK, "2 GPUs OK (driver 550)"),
    (TWO_GPUS, False, 8, UNHEALTHY, "NVML sees 2 GPUs, expected 8"),
    (ONE_BAD, False, None, UNHEALTHY, "gpu1: XID 79 (GPU has fallen off the bus)"),
]


@pytest.mark.parametrize(("reading", "required", "expected", "status", "reason"), NVML_TABLE)
def test_nvml_verdict_table(
    reading: NvmlReading, required: bool, expected: int | None, status: Verdict, reason: str
) -> None:
    policy = GpuPolicy(expected_num_gpus=expected)
    verdict = nvml_verdict(reading, require_nvml=required, policy=policy)
    assert (verdict.status, verdict.reason) == (status, reason)
    json.dumps(verdict.to_dict())


def test_per_gpu_evidence_survives_combination() -> None:
    verdict = nvml_verdict(ONE_BAD)
    assert verdict.evidence["gpu0"]["status"] == "OK"
    assert verdict.evidence["gpu1"]["evidence"]["reading"]["xid_events"] == [79]


def disk(free: int | None, error: ProbeError | None = None) -> DiskReading:
    return DiskReading(
        path="/ckpt", probed_path="/", free_bytes=free, total_bytes=100 * GIB, error=error
    )


MEMORY_OK = MemoryReading(available_bytes=8 * GIB, total_bytes=16 * GIB)
REFUSED = EndpointReading(
    "head", 29400, 2.0, connected=False, error=ProbeError("connect", 111, "Connection refused")
)
REACHED = EndpointReading("head", 29400, 2.0, connected=True, connect_s=0.001)

HOST_TABLE = [
    (HostReading("n0"), HostPolicy(), OK, "no host checks configured"),
    (
        HostReading("n0", disks=(disk(5 * GIB),), memory=MEMORY_OK, endpoint=REACHED),
        HostPolicy(),
        OK,
        "disk /ckpt: 5.0 GiB free; memory: 8.0 GiB available; rendezvous: rendezvous head:29400 "
        "reachable",
    ),
    (
        HostReading("n0", disks=(disk(GIB // 2),)),
        HostPolicy(),
        UNHEALTHY,
        "disk /ckpt: 0.5 GiB free, need 1.0 GiB",
    ),
    (
        HostReading(
            "n0", disks=(disk(None, ProbeError("disk_usage", 13, "/: Permission denied")),)
        ),
        HostPolicy(),
        UNHEALTHY,
        "disk /ckpt: cannot measure free space: /: Permission denied",
    ),
    (
        HostReading("n0", memory=MEMORY_OK),
        HostPolicy(min_available_memory_bytes=10 * GIB),
        UNHEALTHY,
        "memory: 8.0 GiB memory available, need 10.0 GiB",
    ),
    (
        HostReading("n0", memory=MemoryReading(error=ProbeError("meminfo", None, "gone"))),
        HostPolicy(),
        DEGRADED,
        "memory: cannot read available memory: gone",
    ),
    (
        HostReading("n0", memory=MemoryReading(error=ProbeError("meminfo", None, "gone"))),
        HostPolicy(min_available_memory_bytes=1),
        UNHEALTHY,
        "memory: cannot read available memory: gone",
    ),
    (
        HostReading("n0", endpoint=REFUSED),
        HostPolicy(),
        UNHEALTHY,
        "rendezvous: cannot reach rendezvous head:29400 within 2 s: Connection refused",
    ),
]


@pytest.mark.parametrize(("reading", "policy", "status", "reason"), HOST_TABLE)
def test_host_verdict_table(
    reading: HostReading, policy: HostPolicy, status: Verdict, reason: str
) -> None:
    verdict = host_verdict(reading, policy)
    assert (verdict.status, verdict.reason) == (status, reason)
    json.dumps(verdict.to_dict())


def test_node_verdict_is_worst_of_gpus_and_host() -> None:
    host = HostReading("n0", disks=(disk(GIB // 2),))
    verdict = node_verdict(MISSING, host)
    assert verdict.status is UNHEALTHY
    assert verdict.reason == "host: disk /ckpt: 0.5 GiB free, need 1.0 GiB"
    assert verdict.evidence["gpus"]["reason"] == "NVML unavailable: no GPU probes"
    fine = node_verdict(MISSING, HostReading("n0", memory=MEMORY_OK))
    assert (fine.status, fine.reason) == (
        OK,
        "gpus: NVML unavailable: no GPU probes; host: memory: 8.0 GiB available",
    )


@pytest.mark.parametrize(
    ("statuses", "worst"),
    [((), OK), ((OK, OK), OK), ((OK, DEGRADED), DEGRADED), ((UNHEALTHY, DEGRADED, OK), UNHEALTHY)],
)
def test_worst_status(statuses: tuple[Verdict, ...], worst: Verdict) -> None:
    assert worst_status(statuses) is worst


def test_worst_of_names_every_part_at_the_worst_status() -> None:
    parts = {
        "a": HealthVerdict(DEGRADED, "slow"),
        "b": HealthVerdict(UNHEALTHY, "lost"),
        "c": HealthVerdict(UNHEALTHY, "hot"),
    }
    combined = worst_of(parts)
    assert (combined.status, combined.reason) == (UNHEALTHY, "b: lost; c: hot")
    assert combined.evidence["a"] == {"status": "DEGRADED", "reason": "slow", "evidence": {}}


def bandwidth(rank: int, bus: float) -> BandwidthReading:
    return BandwidthReading(
        rank=rank,
        world_size=4,
        size_bytes=1 << 24,
        iterations=5,
        seconds_per_iteration=0.01,
        algorithm_gb_per_s=bus / 1.5,
        bus_gb_per_s=bus,
    )


def test_bandwidth_verdicts_flag_slow_ranks_with_numbers() -> None:
    readings = [bandwidth(0, 10.0), bandwidth(1, 10.0), bandwidth(2, 9.0), bandwidth(3, 4.0)]
    verdicts = bandwidth_verdicts(readings, min_bus_gb_per_s=5.0)
    assert [v.status for v in verdicts.values()] == [OK, OK, OK, DEGRADED]
    assert verdicts[3].reason == (
        "all-reduce bus bandwidth 4.00 GB/s < floor 5.00 GB/s; "
        "all-reduce bus bandwidth 4.00 GB/s < 0.5 × median 9.50 GB/s"
    )
    assert verdicts[3].evidence["median_bus_gb_per_s"] == 9.5
    assert bandwidth_verdicts([]) == {}


def test_node_record_round_trips_and_rejects_bad_fields() -> None:
    record = NodeVerdictRecord(
        "node1",
        "preflight",
        1700000000.5,
        HealthVerdict(UNHEALTHY, "gpus: gpu0: XID 79", {"gpus": {}}),
    )
    data = json.loads(json.dumps(record.to_dict()))
    assert data == {
        "node": "node1",
        "phase": "preflight",
        "checked_at": 1700000000.5,
        "status": "UNHEALTHY",
        "reason": "gpus: gpu0: XID 79",
        "evidence": {"gpus": {}},
    }
    assert NodeVerdictRecord.from_dict(data) == record
    with pytest.raises(ValueError, match="status"):
        NodeVerdictRecord.from_dict(data | {"status": "FINE"})
    with pytest.raises(ValueError, match="checked_at"):
        NodeVerdictRecord.from_dict(data | {"checked_at": "yesterday"})


def test_readings_serialise_enums_and_nested_errors() -> None:
    assert FAILED.to_dict() == {
        "status": "failed",
        "message": "NVML failed (init): Driver Not Loaded (code 9)",
        "driver_version": None,
        "gpus": [],
        "error": {"probe": "init", "code": 9, "message": "Driver Not Loaded"},
    }
