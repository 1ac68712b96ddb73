"""64 simulated nodes against the real controller (`trainctl.sim`): failures decided by the
real policy, spares promoted, a rack excluded in one relaunch, shrink, status rendered.

The agents are simulated (a step clock in two multiplexed processes); everything on the
controller's side is what `trainctl launch` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, sealed_env
from tests.e2e.harness import assert_no_leftovers, events, read_state, trainctl

RACK = [f"node-{i}" for i in range(30, 40)]


def run_sim(storage: Path, job: str, faults: list[dict[str, Any]], *args: str) -> int:
    command = [sys.executable, "-m", "trainctl.sim.job", "--storage", str(storage)]
    command += ["--job-id", job, "--faults", json.dumps(faults), *args]
    try:
        return subprocess.run(
            ["timeout", "-s", "KILL", "180", *command],
            cwd=REPO,
            env=sealed_env(storage),
            capture_output=True,
        ).returncode
    finally:
        assert_no_leftovers(job)


def test_64_nodes_survive_a_kill_an_unhealthy_node_a_freeze_and_a_rack(tmp_path: Path) -> None:
    storage, job = tmp_path / "store", "sim-64"
    faults = [
        {"kind": "kill", "node": "node-5", "step": 15},
        {"kind": "unhealthy", "node": "node-9", "step": 35},
        {"kind": "freeze", "node": "node-20", "step": 55},
        *({"kind": "kill", "node": node, "step": 110} for node in RACK),
    ]
    code = run_sim(
        storage,
        job,
        faults,
        *("--nodes", "64", "--spares", "3", "--min-nodes", "54", "--nproc", "8"),
        *("--max-steps", "160", "--step-s", "0.05", "--checkpoint-every", "10"),
        *("--processes", "2"),
    )
    assert code == 0
    state = read_state(storage, job)
    assert state["state"] == "succeeded"
    excluded = {n["name"] for n in state["nodes"] if n["state"] == "excluded"}
    assert excluded == {"node-5", "node-9", "node-20", *RACK}
    # The spares were promoted one failure at a time; the rack (ten nodes lost within 30 ms)
    # took one relaunch — two at most, if this shared machine delayed the controller reading
    # their losses past `policy.CORRELATED_LOSS_S` — and the job shrank by what the spares
    # could not cover.
    recoveries = [e["data"] for e in events(storage, job) if e["kind"] == "recovery"]
    described = [(r["promoted"], len(r["nodes"]), r["shrunk"]) for r in recoveries]
    assert 4 <= len(recoveries) <= 5, described
    assert [r["promoted"] for r in recoveries[:3]] == [["node-64"], ["node-65"], ["node-66"]]
    assert recoveries[-1]["shrunk"] and len(recoveries[-1]["nodes"]) == 54, described
    assert not set(recoveries[-1]["nodes"]) & excluded
    last = state["attempts"][-1]
    assert last["state"] == "succeeded" and (last["restored_step"] or 0) >= 100
    blocked = json.loads((storage / "jobs" / job / "blocklist.json").read_text())["nodes"]
    assert set(blocked) == excluded

    status = trainctl("status", job, storage=storage, timeout_s=60)
    assert status.returncode == 0, status.stderr
    shown = status.stdout + status.stderr  # the job's lines go to the terminal's stderr
    assert "succeeded" in shown and "node-63" in shown
    assert "UNHEALTHY" in shown and "silent" in shown


def test_a_killed_controller_is_resumed_with_its_simulated_nodes(tmp_path: Path) -> None:
    storage, job = tmp_path / "store", "sim-resume"
    args = ["--nodes", "16", "--spares", "1", "--nproc", "8", "--step-s", "0.05"]
    args += ["--max-steps", "200", "--checkpoint-every", "10", "--processes", "2"]
    command = [sys.executable, "-m", "trainctl.sim.job", "--storage", str(storage)]
    controller = subprocess.Popen(  # killed below, whatever happens: its own hard timeout
        [*command, "--job-id", job, *args],
        cwd=REPO,
        env=sealed_env(storage),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_commit(storage, job, 30)
    finally:
        controller.kill()  # as a dead controller host: its agents see their pipe close
        controller.wait()
    code = run_sim(storage, job, [], "--resume", *args)
    assert code == 0
    state = read_state(storage, job)
    assert state["state"] == "succeeded" and state["final_step"] == 200
    kinds = [e["kind"] for e in events(storage, job)]
    assert "job_resumed" in kinds
    assert (state["attempts"][-1]["restored_step"] or 0) >= 30


def wait_for_commit(storage: Path, job: str, step: int) -> None:
    import time

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if (read_state(storage, job).get("committed_step") or 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{job} never committed step {step}")
