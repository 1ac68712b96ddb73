"""Fixtures for the health tests: the fake NVML library and a way to run code against it.

pynvml loads libnvidia-ml.so.1 once per process, so every scenario that needs the fake runs
in a fresh Python subprocess with LD_LIBRARY_PATH and FAKE_NVML_FILE set; the test process
itself never loads the fake.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_build_module() -> ModuleType:
    # tests/ is not a package (a top-level `health` or `fakenvml` would shadow real packages),
    # so the build helper is loaded by path.
    path = REPO / "tests" / "fakenvml" / "build.py"
    spec = importlib.util.spec_from_file_location("trainctl_tests_fakenvml_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fakenvml = _load_build_module()


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the compiled fake libnvidia-ml.so.1 (built once per session)."""
    return fakenvml.build_or_skip(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture(scope="session")
def real_nvml_present() -> bool:
    """Whether this machine has a real NVML (then 'library missing' cannot be simulated)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.fixture
def no_real_nvml(real_nvml_present: bool) -> None:
    """Skip a test that needs NVML to be absent on a machine that has a real one."""
    if real_nvml_present:
        pytest.skip("a real libnvidia-ml.so.1 is installed: cannot simulate NVML missing")


EnvFactory = Callable[[Path | None, Path | None], dict[str, str]]


def _sealed_env(tmp_path: Path, lib_dir: Path | None, fault_file: Path | None) -> dict[str, str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "NO_COLOR": "1",
        "COLUMNS": "80",
        "TRAINCTL_STORAGE": str(tmp_path / "store"),
        "PYTHONPATH": str(REPO),
    }
    env: dict[str, str] = fakenvml.fake_nvml_env(lib_dir, fault_file, base=base)
    return env


@pytest.fixture
def sealed_env(tmp_path: Path) -> EnvFactory:
    """`sealed_env(lib_dir, fault_file)`: a child environment with no colour, 80 columns, a
    temp HOME and storage root, and the fake NVML when `lib_dir` is given (None: no NVML)."""
    return lambda lib_dir, fault_file: _sealed_env(tmp_path, lib_dir, fault_file)


NvmlRunner = Callable[[str], dict[str, Any]]

_PROBE_SCRIPT = """
import json
from trainctl.health.nvml import read_nvml
from trainctl.health.gpu_verdict import nvml_verdict
reading = read_nvml()
verdict = nvml_verdict(reading)
print(json.dumps({"reading": reading.to_dict(), "verdict": verdict.to_dict()}))
"""


@pytest.fixture
def run_fake_nvml(fake_nvml_lib: Path, tmp_path: Path) -> NvmlRunner:
    """Run `read_nvml` + `nvml_verdict` in a fresh process against a fault file's content.

    Returns ``{"reading": NvmlReading dict, "verdict": HealthVerdict dict}``.
    """

    def run(fault_text: str) -> dict[str, Any]:
        fault_file = tmp_path / "node.nvml"
        fault_file.write_text(fault_text)
        env = _sealed_env(tmp_path, fake_nvml_lib, fault_file)
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return run
