"""`benchmarks/gpu_check.py` on a machine without a usable GPU: it says why, runs nothing and
exits 0 — through the real pynvml paths (no NVML at all; a fake NVML listing GPUs that this
CPU-only torch cannot use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fakenvml.build import build_or_skip

REPO = Path(__file__).resolve().parents[2]


def gpu_check(**env: str) -> tuple[int, dict[str, object], str]:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    return result.returncode, json.loads(result.stdout), result.stderr


def test_without_nvml_it_says_so_and_runs_nothing() -> None:
    code, out, err = gpu_check(LD_LIBRARY_PATH="/nonexistent")
    assert code == 0
    assert out["gpu"] is False and out["ran"] == []
    assert "NVML unavailable" in str(out["reason"]) and "nothing run" in err


def test_gpus_that_torch_cannot_use_are_not_pretended(tmp_path: Path) -> None:
    lib = build_or_skip(tmp_path / "lib")
    nvml = tmp_path / "two.nvml"
    nvml.write_text("device_count=2\n")
    code, out, _ = gpu_check(LD_LIBRARY_PATH=str(lib), FAKE_NVML_FILE=str(nvml))
    assert code == 0
    assert out["gpu"] is False and out["ran"] == []
    assert out["reason"] == "2 GPU(s) in NVML, but torch cannot use them (a CPU-only torch build)"
