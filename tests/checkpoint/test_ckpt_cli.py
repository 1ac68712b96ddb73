"""`trainctl ckpt ls|verify|gc` as a user runs them: a subprocess in a sealed environment,
against checkpoints the real Checkpointer wrote on file:// and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.layout import step_dir_name
from trainctl.checkpoint.storage import open_storage

JOB = "job-7"


def _write_steps(root: str, options: dict[str, Any], steps: list[int]) -> None:
    with Checkpointer(root, interval_steps=1, keep_last=10, storage_options=options) as ckpt:
        for step in steps:
            ckpt.save(step, {"w": torch.full((1000,), float(step)), "extra": {"step": step}})
        ckpt.wait()


def _trainctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainctl.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def sealed_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(("AWS_", "PATH", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(NO_COLOR="1", COLUMNS="100", HOME=str(tmp_path / "home"), TERM="dumb")
    return env


@pytest.fixture(params=["file", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A storage root (job store + checkpoints) on each backend."""
    if request.param == "file":
        return str(tmp_path / "store"), {}
    endpoint = request.getfixturevalue("s3")  # also sets AWS_* for the subprocess
    return endpoint.root("tc"), {}


def test_ls_verify_gc(store_root: tuple[str, dict[str, Any]], sealed_env: dict[str, str]) -> None:
    root, options = store_root
    ckpt_root = f"{root}/checkpoints/{JOB}"
    _write_steps(ckpt_root, options, [10, 20, 30])
    open_storage(ckpt_root).put(f"{step_dir_name(40)}/__0_0.distcp", b"half a save")
    sealed_env["TRAINCTL_STORAGE"] = root

    listed = _trainctl("ckpt", "ls", JOB, "--json", env=sealed_env)
    assert listed.returncode == 0, listed.stderr
    steps = json.loads(listed.stdout)["steps"]
    assert [(s["step"], s["committed"], s["world_size"]) for s in steps] == [
        (10, True, 1),
        (20, True, 1),
        (30, True, 1),
        (40, False, None),
    ]
    human = _trainctl("ckpt", "ls", JOB, env=sealed_env)
    assert human.returncode == 0 and human.stderr == ""  # the table is the answer: stdout
    assert "no manifest" in human.stdout and "STEP" in human.stdout

    verified = _trainctl("ckpt", "verify", JOB, env=sealed_env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == "30"

    dry = _trainctl("ckpt", "gc", JOB, "--dry-run", "--json", env=sealed_env)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)["deleted"]
    assert [(a["step"], a["kind"]) for a in planned] == [(10, "step")]
    assert (
        len(json.loads(_trainctl("ckpt", "ls", JOB, "--json", env=sealed_env).stdout)["steps"]) == 4
    )
    done = _trainctl("ckpt", "gc", JOB, env=sealed_env)
    assert done.returncode == 0 and "deleted" in done.stdout
    after = json.loads(_trainctl("ckpt", "ls", JOB, "--json", env=sealed_env).stdout)["steps"]
    assert [s["step"] for s in after] == [20, 30, 40]  # 40 may still be uploading: kept

    refused = _trainctl("ckpt", "gc", JOB, "--keep-last", "1", env=sealed_env)
    assert refused.returncode == 2 and "keep_last must be at least 2" in refused.stderr


def test_verify_exits_1_on_a_bad_checksum(tmp_path: Path, sealed_env: dict[str, str]) -> None:
    root = str(tmp_path / "store")
    ckpt_root = f"{root}/checkpoints/{JOB}"
    _write_steps(ckpt_root, {}, [5])
    shard = Path(ckpt_root) / step_dir_name(5) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _trainctl("ckpt", "verify", JOB, "--step", "5", "--storage", root, env=sealed_env)
    assert result.returncode == 1
    assert "__0_0.distcp" in result.stderr and "checksum mismatch" in result.stderr
    missing = _trainctl("ckpt", "verify", JOB, "--step", "6", "--storage", root, env=sealed_env)
    assert missing.returncode == 2 and "not committed" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_recipe_checkpoint_storage_is_honoured(tmp_path: Path, sealed_env: dict[str, str]) -> None:
    root, elsewhere = tmp_path / "store", tmp_path / "fast-disk"
    (root / "jobs" / JOB).mkdir(parents=True)
    (root / "jobs" / JOB / "spec.yaml").write_text(
        f"name: x\ncheckpoint:\n  interval_steps: 5\n  keep_last: 3\n  storage: {elsewhere}\n"
    )
    _write_steps(f"{elsewhere}/{JOB}", {}, [5, 10, 15, 20])
    result = _trainctl(
        "ckpt", "gc", JOB, "--dry-run", "--json", "--storage", str(root), env=sealed_env
    )
    assert result.returncode == 0, result.stderr
    assert [a["step"] for a in json.loads(result.stdout)["deleted"]] == [5]  # keep_last: 3
