"""Running trainctl as a user would: a subprocess under a hard external timeout.

gloo's init can hang past its own timeout, so every job runs under `timeout -s KILL`; after each
run the harness asserts that no process of the job (tagged TRAINCTL_JOB_ID=<id>) is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, sealed_env
from trainctl.errors import NotFoundError
from trainctl.launch.zygote import worker_identity
from trainctl.store import JobStore

JOB_TIMEOUT_S = 240


def job_processes(job_id: str) -> list[int]:
    needle = f"TRAINCTL_JOB_ID={job_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def assert_no_leftovers(job_id: str, wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not job_processes(job_id):
            return
        time.sleep(0.1)
    leftovers = job_processes(job_id)
    for pid in leftovers:  # do not poison later tests
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"processes of job {job_id} left behind: {leftovers}")


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def trainctl(*args: str, storage: Path | str, timeout_s: float = 60, **env: str) -> Result:
    """Run a short trainctl command (no job processes)."""
    proc = subprocess.run(
        ["timeout", "-s", "KILL", str(timeout_s), sys.executable, "-m", "trainctl.cli.main", *args],
        cwd=REPO,
        env=sealed_env(storage, **env),
        capture_output=True,
        text=True,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def launch(
    *args: str, job_id: str, storage: Path | str, timeout_s: float = JOB_TIMEOUT_S, **env: str
) -> Result:
    """Run `trainctl launch ... --job-id JOB` to the end; assert nothing is left behind."""
    try:
        return trainctl(
            "launch", "--job-id", job_id, *args, storage=storage, timeout_s=timeout_s, **env
        )
    finally:
        assert_no_leftovers(job_id)


def start_launch(*args: str, job_id: str, storage: Path | str, **env: str) -> subprocess.Popen[str]:
    """Start `trainctl launch` in the background (the caller signals and waits)."""
    return subprocess.Popen(
        [
            "timeout",
            "-s",
            "KILL",
            str(JOB_TIMEOUT_S),
            sys.executable,
            "-m",
            "trainctl.cli.main",
            "launch",
            "--job-id",
            job_id,
            *args,
        ],
        cwd=REPO,
        env=sealed_env(storage, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_state(storage: Path, job_id: str) -> dict[str, Any]:
    """The job's whole record as JSON, assembled by the store from state.json and its pieces
    (FileNotFoundError while the job has no state.json yet, as when this read the file)."""
    try:
        return JobStore(str(storage)).read_state(job_id).to_json()
    except NotFoundError:
        raise FileNotFoundError(f"{storage}/jobs/{job_id}/state.json") from None


def wait_for_step(storage: Path, job_id: str, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = read_state(storage, job_id)
        except (FileNotFoundError, ValueError):
            state = {}
        if (state.get("step") or 0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout_s}s")


def worker_pid(job_id: str, rank: int, timeout_s: float = 60) -> int:
    """The pid of the worker process with global `rank` (not the agent, torchrun or the shim;
    a warm worker carries its rank in its name, not its environment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in job_processes(job_id):
            identity = worker_identity(pid)
            if identity is not None and identity[0] == rank:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker with rank {rank} in job {job_id}")


def workers(job_id: str) -> list[int]:
    """Every training worker of the job alive now."""
    return [pid for pid in job_processes(job_id) if worker_identity(pid) is not None]


def events(storage: Path, job_id: str) -> list[dict[str, Any]]:
    directory = Path(storage) / "jobs" / job_id / "events"
    found = []
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: e["time"])


def wait_for_event(
    storage: Path, job_id: str, kind: str, timeout_s: float = 120, **fields: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in events(storage, job_id):
            if event["kind"] == kind and all(event["data"].get(k) == v for k, v in fields.items()):
                return event
        time.sleep(0.1)
    raise AssertionError(f"no {kind} {fields} event in job {job_id} within {timeout_s}s")


def write_recipe(directory: Path, name: str = "ckpt-gpt", **sections: Any) -> Path:
    """A tiny-gpt recipe (smaller model, slower steps) with sections overridden."""
    import yaml

    recipe: dict[str, Any] = {
        "name": name,
        "script": str(REPO / "recipes" / "tiny_gpt.py"),
        "nodes": 2,
        "seed": 0,
        "config": {
            "vocab": 256,
            "dim": 128,
            "layers": 2,
            "heads": 4,
            "seq_len": 32,
            "batch_size": 8,
            "lr": 0.003,
            "steps": 30,
        },
        "checkpoint": {"interval_steps": 5, "keep_last": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


SLOW = {"step_sleep_s": 0.1, "fingerprint_checkpoints": True}
"""Slow enough that a fault at step 12 lands mid-run; fingerprints at saves and restores."""


def final_loss(storage: Path, job_id: str) -> float:
    done = [e for e in events(storage, job_id) if e["kind"] == "train_finished"]
    assert done, "no train_finished event"
    return float(done[-1]["data"]["loss"])


def kinds(storage: Path, job_id: str) -> list[str]:
    return [e["kind"] for e in events(storage, job_id)]


def blocklist(storage: Path, job_id: str) -> dict[str, Any]:
    path = storage / "jobs" / job_id / "blocklist.json"
    return json.loads(path.read_text())["nodes"] if path.exists() else {}


def committed_steps(storage: Path, job_id: str) -> list[int]:
    root = storage / "checkpoints" / job_id
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/manifest.json"))


def run(tmp_path: Path, storage: Path, job: str, *faults: str, **sections: Any) -> dict[str, Any]:
    config = {**SLOW, **sections.pop("config", {})}
    recipe = write_recipe(tmp_path, job, config=config, **sections)
    args = [arg for fault in faults for arg in ("--fault", fault)]
    result = launch(str(recipe), "--json", *args, job_id=job, storage=storage)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = result.json()
    return out
