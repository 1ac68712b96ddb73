"""Compile the fake NVML library (fakenvml.c) into `<dir>/libnvidia-ml.so.1`.

Test suites call `build_fake_nvml(tmp_dir)` once per session, then start processes with
`fake_nvml_env(lib_dir, fault_file)` so that pynvml's `CDLL("libnvidia-ml.so.1")` finds the
shim first and the shim reads its GPUs and faults from `fault_file`.

Where no C compiler exists the build raises `pytest.skip` with that reason, except under CI
(env `CI` set), where a missing compiler is a failure: CI must exercise the real pynvml paths.

Also a script: `python tests/fakenvml/build.py OUT_DIR` prints the library's directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"


class CompilerMissing(RuntimeError):
    """No C compiler on PATH: the fake NVML library cannot be built."""


def build_fake_nvml(out_dir: str | os.PathLike[str], *, compiler: str | None = None) -> Path:
    """Compile the shim into `out_dir/libnvidia-ml.so.1` and return `out_dir` as a Path.

    Raises `CompilerMissing` when no compiler is found, and `subprocess.CalledProcessError`
    (with the compiler's output) when compilation fails.
    """
    compiler = compiler or os.environ.get("CC") or "gcc"
    if shutil.which(compiler) is None:
        raise CompilerMissing(f"no C compiler {compiler!r} on PATH to build the fake NVML library")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out / LIBRARY_NAME)]
    subprocess.run([*command, str(SOURCE)], check=True, capture_output=True, text=True)
    return out


def build_or_skip(out_dir: str | os.PathLike[str]) -> Path:
    """`build_fake_nvml` for pytest: skip without a compiler, unless env CI is set (then fail)."""
    import pytest

    try:
        return build_fake_nvml(out_dir)
    except CompilerMissing as missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must build it (install gcc)")
        pytest.skip(str(missing))


def fake_nvml_env(
    lib_dir: str | os.PathLike[str] | None,
    fault_file: str | os.PathLike[str] | None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """An environment for a child process: the shim first on LD_LIBRARY_PATH, its fault file.

    `lib_dir=None` leaves NVML missing (the library is simply not found), which is how a CPU
    machine looks. `base` defaults to the current environment.
    """
    env = dict(os.environ if base is None else base)
    env.pop("FAKE_NVML_FILE", None)
    if lib_dir is not None:
        previous = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(lib_dir) + (os.pathsep + previous if previous else "")
    if fault_file is not None:
        env["FAKE_NVML_FILE"] = str(fault_file)
    return env


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build.py OUT_DIR")
    print(build_fake_nvml(sys.argv[1]))
