"""NVML through the real pynvml ctypes paths, against the fake libnvidia-ml.so.1."""

from __future__ import annotations

import json
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


# -- utilisation sampling (GpuSampler) through the real pynvml calls ------------------------------

_SAMPLE_SCRIPT = """
import json, time
from trainctl.health.nvml import sample_gpus
print(json.dumps(sample_gpus(123.0).to_dict()))
"""

BUSY_GPU = (
    "gpu.0.util_gpu=91\ngpu.0.util_memory=42\ngpu.0.memory_used_mib=61440\n"
    "gpu.0.memory_total_mib=81920\ngpu.0.power_mw=650500\ngpu.0.power_limit_mw=700000\n"
    "gpu.0.temperature=71\ngpu.0.sm_clock_mhz=1755\ngpu.0.sm_clock_max_mhz=1980\n"
    "gpu.0.clock_reasons=0x44\ngpu.0.ecc_volatile_corrected=3\n"
)


def sample_with(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path, text: str | None
) -> dict[str, Any]:
    fault_file = tmp_path / "util.nvml"
    if text is not None:
        fault_file.write_text(text)
    env = sealed_env(fake_nvml_lib, fault_file)
    done = subprocess.run(
        [sys.executable, "-c", _SAMPLE_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_sampler_reads_every_utilisation_counter(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    sample = sample_with(fake_nvml_lib, sealed_env, tmp_path, "device_count=2\n" + BUSY_GPU)
    assert sample["status"] == "available" and sample["time"] == 123.0
    busy = sample["gpus"][0]
    assert busy == {
        "index": 0,
        "uuid": "GPU-00000000-fake-0000-0000-000000000000",
        "gpu_util_pct": 91,
        "memory_util_pct": 42,
        "memory_used_bytes": 61440 * 2**20,
        "memory_total_bytes": 81920 * 2**20,
        "power_w": 650.5,
        "power_limit_w": 700.0,
        "temperature_c": 71,
        "sm_clock_mhz": 1755,
        "sm_clock_max_mhz": 1980,
        "clock_event_reasons": 0x44,
        "ecc_corrected_volatile": 3,
        "ecc_uncorrected_volatile": 0,
        "not_supported": [],
        "errors": [],
    }


def test_counters_the_file_omits_are_not_available_not_faults(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    # A fault file written before the utilisation keys existed: a driver without the counters.
    sample = sample_with(
        fake_nvml_lib, sealed_env, tmp_path, "device_count=1\ngpu.0.not_supported=ecc\n"
    )
    gpu = sample["gpus"][0]
    assert gpu["errors"] == []
    assert gpu["not_supported"] == [
        "utilization",
        "memory",
        "power",
        "power_limit",
        "sm_clock",
        "sm_clock_max",
        "ecc.corrected",
        "ecc.uncorrected",
    ]
    assert gpu["gpu_util_pct"] is None and gpu["memory_used_bytes"] is None
    assert gpu["power_w"] is None and gpu["sm_clock_mhz"] is None
    assert gpu["temperature_c"] == 40  # still read: only what is missing is missing


def test_failing_and_lost_gpus_are_errors_in_the_sample(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    text = "device_count=3\n" + BUSY_GPU + "gpu.1.error=999\ngpu.2.lost=1\n"
    gpus = sample_with(fake_nvml_lib, sealed_env, tmp_path, text)["gpus"]
    assert gpus[0]["gpu_util_pct"] == 91 and gpus[0]["errors"] == []
    assert {e["code"] for e in gpus[1]["errors"]} == {999} and gpus[1]["gpu_util_pct"] is None
    assert gpus[2]["errors"] == [{"probe": "handle", "code": 15, "message": "GPU is lost"}]


def test_nvml_that_fails_or_is_missing_says_so(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    failed = sample_with(fake_nvml_lib, sealed_env, tmp_path, "device_count=2\ninit_error=9\n")
    assert failed["status"] == "failed" and failed["gpus"] == []
    assert failed["message"] == "NVML failed (init): Driver Not Loaded (code 9)"
    unreadable = sample_with(fake_nvml_lib, sealed_env, tmp_path, None)
    assert unreadable["status"] == "failed"


def test_missing_library_is_no_gpus_to_sample(sealed_env: EnvFactory, no_real_nvml: None) -> None:
    env = sealed_env(None, None)
    done = subprocess.run(
        [sys.executable, "-c", _SAMPLE_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    sample = json.loads(done.stdout)
    assert (sample["status"], sample["message"]) == (
        "library_missing",
        "NVML unavailable: no GPU probes",
    )


def test_sampler_and_probe_share_nvml_in_one_process(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    # NVML counts its initialisations: the agent's sampler closing must not shut the health
    # probe's NVML down, and one sampler samples many times on one initialisation.
    fault_file = tmp_path / "node.nvml"
    fault_file.write_text("device_count=1\ngpu.0.util_gpu=5\ngpu.0.util_memory=1\n")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from trainctl.health.nvml import GpuSampler, NvmlProbe
        with NvmlProbe() as probe:
            sampler = GpuSampler()
            first = sampler.sample(1.0)
            Path({str(fault_file)!r}).write_text("device_count=1\\ngpu.0.util_gpu=97\\n"
                                                 "gpu.0.util_memory=60\\n")
            second = sampler.sample(2.0)
            sampler.close()
            after = probe.read()
        print(first.gpus[0].gpu_util_pct, second.gpus[0].gpu_util_pct, after.status.value)
        """
    )
    env = sealed_env(fake_nvml_lib, fault_file)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "97", "available"]
