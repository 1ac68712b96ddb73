"""Node health: readings (plain data), pure verdicts and detectors, NVML and host adapters.

The node agent calls `trainctl.health.gate.preflight` (or keeps a `NodeProber`); the controller
calls the pure detectors in `trainctl.health.progress`. See each module's docstring.
"""
