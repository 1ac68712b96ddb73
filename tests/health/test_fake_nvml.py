"""NVML through the real pynvml ctypes paths, against the fake libnvidia-ml.so.1."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

NvmlRunner = Callable[[str], dict[str, Any]]
EnvFactory = Callable[[Path | None, Path | None], dict[str, str]]


def gpu(result: dict, index: int) -> dict:
    return result["reading"]["gpus"][index]


def test_healthy_gpus_are_ok_and_fully_read(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml("device_count=2\ndriver_version=550.90.07\n")
    assert result["verdict"]["status"] == "OK"
    assert result["verdict"]["reason"] == "2 GPUs OK (driver 550.90.07)"
    first = gpu(result, 0)
    assert first["name"] == "NVIDIA H100 80GB HBM3"
    assert first["uuid"].startswith("GPU-")
    # The default fake mimics a driver without the recovery-action field (before r550).
    assert first["errors"] == [] and first["not_supported"] == ["recovery_action"]
    assert first["temperature_c"] == 40 and first["slowdown_threshold_c"] == 90
    assert first["ecc_uncorrected_volatile"] == 0 and first["row_remap_failed"] is False


@pytest.mark.parametrize(
    ("faults", "status", "reason"),
    [
        (
            "gpu.1.lost=1",
            "UNHEALTHY",
            "gpu1: GPU is lost (fell off the bus): NVML said so on handle",
        ),
        (
            "gpu.0.error=15",
            "UNHEALTHY",
            "gpu0: GPU is lost (fell off the bus): NVML said so on name",
        ),
        ("gpu.1.xid=79", "UNHEALTHY", "gpu1: XID 79 (GPU has fallen off the bus)"),
        ("gpu.0.xid=13", "OK", "2 GPUs OK (driver 550.54.15)"),
        ("gpu.0.xid=63", "DEGRADED", "gpu0: XID 63 (ECC page retirement or row remap recorded)"),
        (
            "gpu.0.ecc_volatile_uncorrected=2",
            "UNHEALTHY",
            "gpu0: 2 uncorrectable (double-bit) ECC errors since the driver loaded",
        ),
        (
            "gpu.0.ecc_aggregate_uncorrected=3",
            "DEGRADED",
            "gpu0: 3 uncorrectable ECC errors in the GPU's lifetime (none since the driver loaded)",
        ),
        (
            "gpu.1.remap_failed=1",
            "UNHEALTHY",
            "gpu1: row remapping failed: no spare rows, GPU needs service",
        ),
        (
            "gpu.0.retired_pages_pending=1",
            "UNHEALTHY",
            "gpu0: retired pages pending: reset the GPU to retire them",
        ),
        (
            "gpu.0.temperature=93\ngpu.0.clock_reasons=0x40",
            "DEGRADED",
            "gpu0: thermal slowdown: 93 °C ≥ slowdown threshold 90 °C; "
            "clocks throttled: hw_thermal_slowdown",
        ),
        ("gpu.0.recovery_action=2", "UNHEALTHY", "gpu0: driver recommends recovery: node reboot"),
        (
            "gpu.0.error=999\ngpu.0.not_supported=events",
            "UNHEALTHY",
            "gpu0: NVML error on name, uuid, ecc.uncorrected.volatile, ecc.uncorrected.aggregate, "
            "ecc.corrected.volatile, retired_pages_pending, remapped_rows, recovery_action, "
            "temperature, slowdown_threshold, clock_event_reasons: Unknown Error (code 999)",
        ),
    ],
)
def test_each_fault_gives_its_verdict(
    run_fake_nvml: NvmlRunner, faults: str, status: str, reason: str
) -> None:
    result = run_fake_nvml(f"device_count=2\n{faults}\n")
    assert (result["verdict"]["status"], result["verdict"]["reason"]) == (status, reason)


def test_xid_79_evidence_names_the_xid(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml("device_count=2\ngpu.1.xid=79\n")
    evidence = result["verdict"]["evidence"]["gpu1"]["evidence"]
    assert evidence["xids"] == {"79": "GPU has fallen off the bus"}
    assert gpu(result, 1)["xid_events"] == [79]
    assert gpu(result, 0)["xid_events"] == []


def test_lost_gpu_stops_querying_after_the_first_loss(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml("device_count=1\ngpu.0.error=15\n")
    errors = gpu(result, 0)["errors"]
    assert [(e["probe"], e["code"], e["message"]) for e in errors] == [("name", 15, "GPU is lost")]


def test_unsupported_queries_are_not_available_not_faults(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml(
        "device_count=1\ngpu.0.not_supported=ecc,remap,retired_pages,recovery_action,events\n"
    )
    assert result["verdict"]["status"] == "OK"
    reading = gpu(result, 0)
    assert reading["not_supported"] == [
        "ecc.uncorrected.volatile",
        "ecc.uncorrected.aggregate",
        "ecc.corrected.volatile",
        "retired_pages_pending",
        "remapped_rows",
        "recovery_action",
        "xid_events",
    ]
    assert reading["ecc_uncorrected_volatile"] is None and reading["row_remap_failed"] is None


def test_init_error_with_gpus_present_fails_closed(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml("device_count=8\ninit_error=9\n")
    assert result["reading"]["status"] == "failed"
    assert result["reading"]["error"] == {
        "probe": "init",
        "code": 9,
        "message": "Driver Not Loaded",
    }
    assert result["verdict"]["status"] == "UNHEALTHY"
    assert result["verdict"]["reason"] == "NVML failed (init): Driver Not Loaded (code 9)"


def test_no_gpus_is_ok_unless_required(run_fake_nvml: NvmlRunner) -> None:
    result = run_fake_nvml("device_count=0\n")
    assert result["reading"]["status"] == "available" and result["reading"]["gpus"] == []
    assert result["verdict"] == {
        "status": "OK",
        "reason": "NVML reports no GPUs on this machine",
        "evidence": {"nvml": result["reading"]},
    }


def test_unreadable_fault_file_is_a_failure_not_a_healthy_machine(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    # The shim fails init when its file is missing, so a typo cannot pass as healthy.
    env = sealed_env(fake_nvml_lib, tmp_path / "does-not-exist.nvml")
    script = "from trainctl.health.nvml import read_nvml; print(read_nvml().status.value)"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "failed"


def test_library_missing_fails_open(sealed_env: EnvFactory, no_real_nvml: None) -> None:
    env = sealed_env(None, None)
    script = textwrap.dedent(
        """
        from trainctl.health.nvml import read_nvml
        from trainctl.health.gpu_verdict import nvml_verdict
        reading = read_nvml()
        print(reading.status.value, "|", nvml_verdict(reading).status.value, "|", reading.message)
        print(nvml_verdict(reading, require_nvml=True).status.value)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "library_missing | OK | NVML unavailable: no GPU probes",
        "UNHEALTHY",
    ]


def test_probe_kept_open_sees_xids_raised_between_reads(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    fault_file = tmp_path / "node.nvml"
    fault_file.write_text("device_count=2\n")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from trainctl.health.nvml import NvmlProbe
        with NvmlProbe() as probe:
            first = probe.read()
            Path({str(fault_file)!r}).write_text("device_count=2\\ngpu.0.xid=48,79\\n")
            second = probe.read()
            third = probe.read()
        print([g.xid_events for g in first.gpus])
        print([g.xid_events for g in second.gpus])
        print([g.xid_events for g in third.gpus])
        """
    )
    env = sealed_env(fake_nvml_lib, fault_file)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[(), ()]", "[(48, 79), ()]", "[(), ()]"]


def test_build_without_a_compiler_says_so(tmp_path: Path) -> None:
    from tests.health.conftest import fakenvml

    with pytest.raises(fakenvml.CompilerMissing, match="no C compiler 'no-such-cc'"):
        fakenvml.build_fake_nvml(tmp_path, compiler="no-such-cc")
