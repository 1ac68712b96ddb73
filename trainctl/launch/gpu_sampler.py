"""The node agent's GPU utilisation sampling: a sample of every GPU with each health probe.

One `GpuSampler` (one NVML initialisation) for the agent's whole life, across attempts; each
sample becomes a `GpuUsage` message for the controller, which keeps the job's GPU time series.
Kept apart from the health gate: the gate judges faults, this only measures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from trainctl.health.nvml import GpuSampler
from trainctl.protocol import GpuUsage


class GpuUsageSampler:
    """Samples this node's GPUs on request; safe to call from the probe thread and the agent's
    main loop alike. Never raises an NVML error (a failure is in the sample)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._sampler = GpuSampler()
        self._clock = clock
        self._lock = threading.Lock()

    def sample(self, phase: str) -> GpuUsage:
        """A sample of every GPU now, as the message that carries it (`phase`: why it was
        taken: ``preflight``, ``running`` or ``standby``)."""
        with self._lock:
            return GpuUsage(phase, self._sampler.sample(self._clock()))

    def close(self) -> None:
        with self._lock:
            self._sampler.close()
