"""The NVML adapter: reads every GPU through pynvml into `NvmlReading`, judging nothing.

Failure rules (the verdict applies them; this module only records what happened):

- no ``libnvidia-ml.so.1`` → `NvmlStatus.LIBRARY_MISSING` with the message
  ``NVML unavailable: no GPU probes`` (fail-open: a CPU machine has no GPUs to check);
- NVML present but failing (init error such as driver not loaded, device count failing)
  → `NvmlStatus.FAILED` (fail-closed: a GPU machine we cannot inspect is not healthy);
- a query failing on one GPU → a `ProbeError` in that GPU's reading (fail-closed);
- a query the driver does not support (NOT_SUPPORTED, or a symbol an older driver lacks)
  → the query's name in `GpuReading.not_supported` (not available, not a fault).

XIDs arrive through an NVML event set. A real driver delivers only events raised *after*
registration, so `NvmlProbe` keeps its event set between reads: a node agent that creates one
probe and reads it every interval sees every XID since its first read.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from trainctl.health.readings import (
    GpuReading,
    GpuUtilisation,
    NvmlReading,
    NvmlStatus,
    ProbeError,
    UtilisationSample,
)

NVML_UNAVAILABLE = "NVML unavailable: no GPU probes"
"""What the GPU probe says on a machine without NVML (the fail-open case)."""

# Older nvidia-ml-py releases lack the constant; the field id is part of the driver ABI.
_FIELD_RECOVERY_ACTION: int = getattr(pynvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230)
_XID_EVENT: int = pynvml.nvmlEventTypeXidCriticalError
_MAX_EVENTS_PER_READ = 1024
"""Bound on events drained per read, so a storm of XIDs cannot stall a probe."""

T = TypeVar("T")


def _error(probe: str, error: pynvml.NVMLError) -> ProbeError:
    return ProbeError(probe=probe, code=int(error.value), message=str(error))


class _GpuQueries:
    """Runs the queries of one GPU, sorting failures into errors and not-supported.

    After the GPU is reported lost, further queries are skipped: each would only repeat it.
    """

    def __init__(self) -> None:
        self.errors: list[ProbeError] = []
        self.not_supported: list[str] = []
        self.lost = False

    def get(self, probe: str, query: Callable[..., T], *args: Any) -> T | None:
        """`query(*args)`, or None with the failure recorded under `probe`."""
        if self.lost:
            return None
        try:
            return query(*args)
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
            self.not_supported.append(probe)
        except pynvml.NVMLError as error:
            self.errors.append(_error(probe, error))
            self.lost = int(error.value) == pynvml.NVML_ERROR_GPU_IS_LOST
        return None


def _clock_event_reasons(handle: Any) -> int:
    """Active clock event reasons; drivers before 535 only export the 'throttle' name."""
    try:
        return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except pynvml.NVMLError_FunctionNotFound:
        return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _recovery_action(handle: Any) -> int:
    """The driver's recommended recovery action (a field value; NOT_SUPPORTED raises)."""
    (value,) = pynvml.nvmlDeviceGetFieldValues(handle, [_FIELD_RECOVERY_ACTION])
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(value.nvmlReturn)
    return int(value.value.uiVal)


def read_gpu(index: int, handle: Any, xid_events: tuple[int, ...] = ()) -> GpuReading:
    """Query one GPU whose handle is known; never raises an NVMLError."""
    queries = _GpuQueries()
    q = queries.get
    name = q("name", pynvml.nvmlDeviceGetName, handle)
    uuid = q("uuid", pynvml.nvmlDeviceGetUUID, handle)
    uncorrected, corrected = (
        pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
    )
    volatile, aggregate = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
    ecc = pynvml.nvmlDeviceGetTotalEccErrors
    ecc_unc_volatile = q("ecc.uncorrected.volatile", ecc, handle, uncorrected, volatile)
    ecc_unc_aggregate = q("ecc.uncorrected.aggregate", ecc, handle, uncorrected, aggregate)
    ecc_cor_volatile = q("ecc.corrected.volatile", ecc, handle, corrected, volatile)
    pages_pending = q(
        "retired_pages_pending", pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle
    )
    remap = q("remapped_rows", pynvml.nvmlDeviceGetRemappedRows, handle)
    recovery = q("recovery_action", _recovery_action, handle)
    temperature = q(
        "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
    )
    slowdown = q(
        "slowdown_threshold",
        pynvml.nvmlDeviceGetTemperatureThreshold,
        handle,
        pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    )
    clocks = q("clock_event_reasons", _clock_event_reasons, handle)
    remap_corrected, remap_uncorrected, remap_pending, remap_failed = remap or (None,) * 4
    return GpuReading(
        index=index,
        name=name,
        uuid=uuid,
        errors=tuple(queries.errors),
        not_supported=tuple(queries.not_supported),
        xid_events=xid_events,
        ecc_uncorrected_volatile=ecc_unc_volatile,
        ecc_uncorrected_aggregate=ecc_unc_aggregate,
        ecc_corrected_volatile=ecc_cor_volatile,
        retired_pages_pending=None if pages_pending is None else bool(pages_pending),
        remapped_rows_corrected=remap_corrected,
        remapped_rows_uncorrected=remap_uncorrected,
        row_remap_pending=None if remap_pending is None else bool(remap_pending),
        row_remap_failed=None if remap_failed is None else bool(remap_failed),
        recovery_action=recovery,
        temperature_c=temperature,
        slowdown_threshold_c=slowdown,
        clock_event_reasons=clocks,
    )


def _address(handle: Any) -> int | None:
    """A device handle's address: how an event's device is matched to its index."""
    return ctypes.cast(handle, ctypes.c_void_p).value


class NvmlProbe:
    """Reads this machine's GPUs through NVML, keeping NVML and an XID event set open.

    Use one per process (pynvml loads the library once): ``with NvmlProbe() as probe:
    reading = probe.read()``. `read` never raises an NVML error; failures are in the
    reading. `xid_wait_ms` is how long each read waits for the first XID event (0: only
    collect what is already pending).
    """

    def __init__(self, *, xid_wait_ms: int = 0) -> None:
        self.xid_wait_ms = xid_wait_ms
        self._initialized = False
        self._event_set: Any = None
        self._handles: dict[int, Any] = {}
        self._event_errors: dict[int, ProbeError] = {}
        self._events_not_supported: set[int] = set()

    def __enter__(self) -> NvmlProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self) -> NvmlReading:
        """One reading of every GPU (see the module docstring for the failure rules)."""
        if not self._initialized:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError_LibraryNotFound as missing:
                return NvmlReading(
                    NvmlStatus.LIBRARY_MISSING, NVML_UNAVAILABLE, error=_error("init", missing)
                )
            except pynvml.NVMLError as error:
                return self._failed("init", error)
            self._initialized = True
        try:
            driver_version = str(pynvml.nvmlSystemGetDriverVersion())
            num_gpus = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            return self._failed("device_count", error)

        self._event_errors = {}  # each reading reports this read's event failures only
        handles: dict[int, Any] = {}
        lost: dict[int, ProbeError] = {}
        for index in range(num_gpus):
            try:
                handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as error:
                lost[index] = _error("handle", error)
        xids = self._drain_xids(handles)

        gpus = []
        for index in range(num_gpus):
            if index in lost:
                gpus.append(GpuReading(index=index, errors=(lost[index],)))
                continue
            gpu = read_gpu(index, handles[index], tuple(xids.get(index, ())))
            event_error = self._event_errors.get(index)
            # A lost GPU also fails event registration; that repeats the loss, not news.
            known_codes = {error.code for error in gpu.errors}
            extra_errors = (
                (event_error,) if event_error and event_error.code not in known_codes else ()
            )
            extra_not_supported = ("xid_events",) if index in self._events_not_supported else ()
            gpus.append(
                dataclasses.replace(
                    gpu,
                    errors=gpu.errors + extra_errors,
                    not_supported=gpu.not_supported + extra_not_supported,
                )
            )
        return NvmlReading(
            NvmlStatus.AVAILABLE,
            f"NVML driver {driver_version}: {num_gpus} GPUs",
            driver_version=driver_version,
            gpus=tuple(gpus),
        )

    def _failed(self, probe: str, error: pynvml.NVMLError) -> NvmlReading:
        message = f"NVML failed ({probe}): {error} (code {int(error.value)})"
        return NvmlReading(NvmlStatus.FAILED, message, error=_error(probe, error))

    def _register(self, handles: dict[int, Any]) -> None:
        """Register XID events for GPUs not yet registered (first read, or a GPU came back)."""
        if self._event_set is None:
            self._event_set = pynvml.nvmlEventSetCreate()
        for index, handle in handles.items():
            if index in self._handles:
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(handle, _XID_EVENT, self._event_set)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
                self._events_not_supported.add(index)
            except pynvml.NVMLError as error:
                self._event_errors[index] = _error("xid_events", error)
                continue
            self._handles[index] = handle

    def _drain_xids(self, handles: dict[int, Any]) -> dict[int, list[int]]:
        """Collect pending XID events per GPU index."""
        try:
            self._register(handles)
        except pynvml.NVMLError as error:  # the event set itself could not be created
            for index in handles:
                self._event_errors[index] = _error("xid_events", error)
            return {}
        index_of = {_address(handle): index for index, handle in self._handles.items()}
        xids: dict[int, list[int]] = {}
        wait_ms = self.xid_wait_ms
        for _ in range(_MAX_EVENTS_PER_READ):
            try:
                event = pynvml.nvmlEventSetWait(self._event_set, wait_ms)
            except pynvml.NVMLError_Timeout:
                break
            except pynvml.NVMLError as error:
                for index in handles:
                    self._event_errors[index] = _error("xid_events", error)
                break
            wait_ms = 0  # after the first event, only take what is already queued
            source = index_of.get(_address(event.device))
            if source is not None and event.eventType & _XID_EVENT:
                xids.setdefault(source, []).append(int(event.eventData))
        return xids

    def close(self) -> None:
        """Free the event set and shut NVML down (only what was opened), even if freeing fails."""
        event_set, self._event_set = self._event_set, None
        try:
            if event_set is not None:
                pynvml.nvmlEventSetFree(event_set)
        finally:
            if self._initialized:
                self._initialized = False
                self._handles.clear()
                pynvml.nvmlShutdown()


def read_nvml(*, xid_wait_ms: int = 0) -> NvmlReading:
    """One-shot reading: open NVML, read every GPU, close. Never raises an NVML error."""
    with NvmlProbe(xid_wait_ms=xid_wait_ms) as probe:
        return probe.read()


# -- utilisation sampling ---------------------------------------------------------------------


def _milliwatts(value: int | None) -> float | None:
    return None if value is None else value / 1000.0


def sample_gpu(index: int, handle: Any) -> GpuUtilisation:
    """How busy one GPU is now (utilisation, memory, power, clocks, temperature, throttling,
    ECC); an unsupported query is listed in `not_supported`, a failing one in `errors`."""
    queries = _GpuQueries()
    q = queries.get
    uuid = q("uuid", pynvml.nvmlDeviceGetUUID, handle)
    rates = q("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
    memory = q("memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
    power = q("power", pynvml.nvmlDeviceGetPowerUsage, handle)
    limit = q("power_limit", pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    temperature = q(
        "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
    )
    sm = pynvml.NVML_CLOCK_SM
    clock = q("sm_clock", pynvml.nvmlDeviceGetClockInfo, handle, sm)
    clock_max = q("sm_clock_max", pynvml.nvmlDeviceGetMaxClockInfo, handle, sm)
    reasons = q("clock_event_reasons", _clock_event_reasons, handle)
    ecc = pynvml.nvmlDeviceGetTotalEccErrors
    volatile = pynvml.NVML_VOLATILE_ECC
    corrected = q("ecc.corrected", ecc, handle, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, volatile)
    uncorrected = q(
        "ecc.uncorrected", ecc, handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, volatile
    )
    return GpuUtilisation(
        index=index,
        uuid=uuid,
        gpu_util_pct=None if rates is None else int(rates.gpu),
        memory_util_pct=None if rates is None else int(rates.memory),
        memory_used_bytes=None if memory is None else int(memory.used),
        memory_total_bytes=None if memory is None else int(memory.total),
        power_w=_milliwatts(power),
        power_limit_w=_milliwatts(limit),
        temperature_c=temperature,
        sm_clock_mhz=clock,
        sm_clock_max_mhz=clock_max,
        clock_event_reasons=reasons,
        ecc_corrected_volatile=corrected,
        ecc_uncorrected_volatile=uncorrected,
        not_supported=tuple(queries.not_supported),
        errors=tuple(queries.errors),
    )


class GpuSampler:
    """Samples every GPU's utilisation, keeping NVML initialised between samples.

    One per process, for its whole life: NVML is initialised on the first `sample` (retried on
    the next while it fails) and shut down by `close`, never once per sample. NVML counts its
    initialisations, so a sampler and an `NvmlProbe` coexist in one process.
    """

    def __init__(self) -> None:
        self._initialized = False

    def __enter__(self) -> GpuSampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sample(self, now: float) -> UtilisationSample:
        """Every GPU now, stamped `now` (the caller's clock). Never raises an NVML error."""
        if not self._initialized:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError_LibraryNotFound:
                return UtilisationSample(now, NvmlStatus.LIBRARY_MISSING, message=NVML_UNAVAILABLE)
            except pynvml.NVMLError as error:
                return self._failed(now, "init", error)
            self._initialized = True
        try:
            num_gpus = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            return self._failed(now, "device_count", error)
        gpus = []
        for index in range(num_gpus):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as error:
                gpus.append(GpuUtilisation(index=index, errors=(_error("handle", error),)))
                continue
            gpus.append(sample_gpu(index, handle))
        return UtilisationSample(now, NvmlStatus.AVAILABLE, tuple(gpus))

    def _failed(self, now: float, probe: str, error: pynvml.NVMLError) -> UtilisationSample:
        message = f"NVML failed ({probe}): {error} (code {int(error.value)})"
        return UtilisationSample(now, NvmlStatus.FAILED, message=message)

    def close(self) -> None:
        """Shut NVML down if this sampler initialised it."""
        if self._initialized:
            self._initialized = False
            pynvml.nvmlShutdown()


def sample_gpus(now: float) -> UtilisationSample:
    """One-shot sample: initialise NVML, sample every GPU, shut down."""
    with GpuSampler() as sampler:
        return sampler.sample(now)
