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


def test_the_probe_checks_what_trainctls_sampler_reads(tmp_path: Path) -> None:
    """The probe's readings and ranges, through the real pynvml paths on a fake H100 and one
    whose readings are broken (a GPU check that cannot fail would prove nothing)."""
    lib = build_or_skip(tmp_path / "lib")
    nvml = tmp_path / "h100.nvml"
    nvml.write_text(
        "device_count=2\n"
        + "".join(
            f"gpu.{i}.util_gpu=97\ngpu.{i}.util_memory=40\ngpu.{i}.memory_used_mib=70000\n"
            f"gpu.{i}.memory_total_mib=81559\ngpu.{i}.power_mw=650000\n"
            f"gpu.{i}.power_limit_mw=700000\ngpu.{i}.temperature=61\n"
            f"gpu.{i}.sm_clock_mhz=1980\ngpu.{i}.sm_clock_max_mhz=1980\n"
            for i in range(2)
        )
        + "gpu.1.temperature=140\n"  # the file's last word wins: gpu1 reads 140 C
    )
    script = (
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "import gpu_check\n"
        "from trainctl.health.nvml import sample_gpus\n"
        "gpus = [g.to_dict() for g in sample_gpus(time.time()).gpus]\n"
        "print(json.dumps({'gpus': gpus, 'problems': gpu_check.check_readings(gpus)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LD_LIBRARY_PATH": str(lib), "FAKE_NVML_FILE": str(nvml)},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [g["power_w"] for g in out["gpus"]] == [650.0, 650.0]
    assert out["problems"] == ["gpu1 temperature_c=140 outside [5, 105]"]
