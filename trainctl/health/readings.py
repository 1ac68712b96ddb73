"""What the probes saw, as plain data: no interpretation, no I/O.

Adapters (`nvml.py`, `host.py`) fill these in; the pure `verdict.py` judges them. Every class
is a frozen dataclass whose `to_dict()` is JSON-serialisable (enums are `str` enums, tuples
become lists), so a reading can go into the job store as the evidence of a verdict.

`None` in a reading means "not available" (the driver does not support that query, or the
probe was not asked for); a failure to read is recorded as a `ProbeError`, never dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any


def _plain(value: Any) -> Any:
    """dataclasses.asdict-compatible conversion that also turns enums into their values."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


class _Plain:
    """Mixin: `to_dict()` for frozen dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (nested readings included)."""
        assert dataclasses.is_dataclass(self) and not isinstance(self, type)
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


@dataclasses.dataclass(frozen=True)
class ProbeError(_Plain):
    """A query that failed. For NVML, `code` is the `nvmlReturn_t` value (15: GPU is lost)."""

    probe: str
    """Which query failed, e.g. ``handle``, ``ecc.volatile.uncorrected``, ``init``."""
    code: int | None
    """The library's error code where it has one (NVML return code); None for OS errors."""
    message: str
    """The library's own message, e.g. ``GPU is lost``."""


class NvmlStatus(str, enum.Enum):
    """Whether NVML could be used at all on this machine."""

    AVAILABLE = "available"
    """The library loaded and initialised; `gpus` holds one reading per device."""
    LIBRARY_MISSING = "library_missing"
    """No libnvidia-ml.so.1: a machine without NVIDIA drivers. GPU probes cannot run."""
    FAILED = "failed"
    """The library is there but failed (e.g. driver not loaded, device count failed)."""


@dataclasses.dataclass(frozen=True)
class GpuReading(_Plain):
    """One GPU as NVML reported it. `None` fields were not available on this GPU/driver."""

    index: int
    name: str | None = None
    uuid: str | None = None
    errors: tuple[ProbeError, ...] = ()
    """Queries that failed on this GPU (NVML errors other than NOT_SUPPORTED)."""
    not_supported: tuple[str, ...] = ()
    """Queries the driver answered with NOT_SUPPORTED (absent features, not faults)."""
    xid_events: tuple[int, ...] = ()
    """XID error codes delivered through the NVML event set since the last probe."""
    ecc_uncorrected_volatile: int | None = None
    """Uncorrectable (double-bit) ECC errors since the driver was loaded."""
    ecc_uncorrected_aggregate: int | None = None
    """Uncorrectable ECC errors over the GPU's lifetime."""
    ecc_corrected_volatile: int | None = None
    retired_pages_pending: bool | None = None
    """Pre-Ampere page retirement: pages waiting for a reset to be retired."""
    remapped_rows_corrected: int | None = None
    remapped_rows_uncorrected: int | None = None
    row_remap_pending: bool | None = None
    """Ampere+ row remapping: a remap waits for a GPU reset."""
    row_remap_failed: bool | None = None
    """Ampere+ row remapping failed: no spare rows left."""
    recovery_action: int | None = None
    """The driver's recommended action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION), where offered."""
    temperature_c: int | None = None
    slowdown_threshold_c: int | None = None
    clock_event_reasons: int | None = None
    """Bitmask of active clock-throttle (clock event) reasons."""


@dataclasses.dataclass(frozen=True)
class NvmlReading(_Plain):
    """Everything NVML said about this machine's GPUs in one probe."""

    status: NvmlStatus
    message: str
    """A sentence for people, e.g. ``NVML unavailable: no GPU probes``."""
    driver_version: str | None = None
    gpus: tuple[GpuReading, ...] = ()
    error: ProbeError | None = None
    """Why NVML as a whole failed (status FAILED) or was missing (LIBRARY_MISSING)."""


@dataclasses.dataclass(frozen=True)
class DiskReading(_Plain):
    """Free space of the filesystem that holds `path`."""

    path: str
    """The path asked about (a checkpoint or log directory)."""
    probed_path: str | None = None
    """The nearest existing ancestor actually measured (the path may not exist yet)."""
    free_bytes: int | None = None
    total_bytes: int | None = None
    error: ProbeError | None = None


@dataclasses.dataclass(frozen=True)
class MemoryReading(_Plain):
    """Host memory, from /proc/meminfo (MemAvailable: what a new process can get)."""

    available_bytes: int | None = None
    total_bytes: int | None = None
    error: ProbeError | None = None


@dataclasses.dataclass(frozen=True)
class EndpointReading(_Plain):
    """Whether a TCP connection to the rendezvous endpoint succeeded within the timeout."""

    host: str
    port: int
    timeout_s: float
    connected: bool
    connect_s: float | None = None
    """Seconds the successful connect took."""
    error: ProbeError | None = None


@dataclasses.dataclass(frozen=True)
class BandwidthReading(_Plain):
    """One rank's timing of an all-reduce of `size_bytes` (NCCL-tests conventions)."""

    rank: int
    world_size: int
    size_bytes: int
    iterations: int
    seconds_per_iteration: float
    algorithm_gb_per_s: float
    """size / time."""
    bus_gb_per_s: float
    """algorithm bandwidth × 2(n−1)/n: comparable across world sizes (0 for one rank)."""
    node: str | None = None


@dataclasses.dataclass(frozen=True)
class HostReading(_Plain):
    """Everything the host probes saw in one probe."""

    hostname: str
    disks: tuple[DiskReading, ...] = ()
    memory: MemoryReading | None = None
    endpoint: EndpointReading | None = None


@dataclasses.dataclass(frozen=True)
class GpuUtilisation(_Plain):
    """How busy one GPU was at one moment, as NVML reported it. `None`: not available.

    Sampled every probe interval (not judged for faults: `GpuReading` is for that), so a job's
    GPU use can be followed over time at every layer: node, attempt, job.
    """

    index: int
    uuid: str | None = None
    gpu_util_pct: int | None = None
    """Percent of the last sample period in which a kernel ran (nvmlDeviceGetUtilizationRates)."""
    memory_util_pct: int | None = None
    """Percent of the period in which device memory was read or written."""
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    """The enforced power limit."""
    temperature_c: int | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    clock_event_reasons: int | None = None
    """Bitmask of active clock event (throttle) reasons; names in `gpu_verdict`."""
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    not_supported: tuple[str, ...] = ()
    errors: tuple[ProbeError, ...] = ()


@dataclasses.dataclass(frozen=True)
class UtilisationSample(_Plain):
    """Every GPU of one node at one moment (`time`: seconds since the epoch)."""

    time: float
    status: NvmlStatus
    gpus: tuple[GpuUtilisation, ...] = ()
    message: str = ""
    """Why there are no GPUs to show (NVML missing or failed); empty when available."""

    def to_compact(self) -> dict[str, Any]:
        """`to_dict` without the fields that say nothing (None, empty): the stored form."""
        data = self.to_dict()
        data["gpus"] = [
            {key: value for key, value in gpu.items() if value not in (None, [])}
            for gpu in data["gpus"]
        ]
        if not data["message"]:
            del data["message"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UtilisationSample:
        """Read back `to_dict`/`to_compact` output; ValueError (naming the field) if it does
        not fit."""
        from pydantic import ValidationError

        from trainctl.errors import first_problem

        try:
            sample: UtilisationSample = _sample_adapter().validate_python(data)
        except ValidationError as bad:
            raise ValueError(first_problem(bad)) from None
        return sample


@functools.cache
def _sample_adapter() -> Any:
    from pydantic import TypeAdapter  # imported on first use: readings stay light to import

    return TypeAdapter(UtilisationSample)
