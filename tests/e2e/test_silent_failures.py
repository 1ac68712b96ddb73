"""Failures that do not announce themselves, and blame that names the culprit.

Real 2-node tiny-gpt jobs on the local scheduler. A frozen node (every process SIGSTOPped: its
sockets stay open, as with a host that died without a FIN) is found by its missing heartbeats,
blamed and excluded like a killed one. After each: the final fingerprint equals the
uninterrupted run's and no process of the job is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, sealed_env
from tests.e2e.harness import (
    SLOW,
    assert_no_leftovers,
    blocklist,
    events,
    job_processes,
    launch,
    read_state,
    run,
    start_launch,
    trainctl,
    wait_for_event,
    wait_for_step,
    write_recipe,
)

pytestmark = pytest.mark.e2e


def excluded_after(storage: Path, job_id: str, node: str) -> float:
    """Seconds from the injected fault to the node's exclusion, from the job's events."""
    fired = next(e for e in events(storage, job_id) if e["kind"] == "fault_injected")
    excluded = next(
        e for e in events(storage, job_id) if e["kind"] == "node_excluded" and e["node"] == node
    )
    return float(excluded["time"]) - float(fired["time"])


def test_frozen_node_is_found_by_its_silence_and_replaced_by_the_spare(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(tmp_path, storage, "frozen", "freeze-node:node-1@step=12", spare_nodes=1)
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "frozen")
    first, second = state["attempts"]
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1")
    assert "agent silent for" in first["reason"] and "heartbeats every" in first["reason"]
    assert second["nodes"] == ["node-0", "node-2"]
    entry = blocklist(storage, "frozen")["node-1"]
    assert "silent" in entry["reason"] and entry["expires_at"] > time.time()
    # Found by silence, not by the hang detector (its floor is 60 s) nor by a closed socket.
    assert not [e for e in events(storage, "frozen") if e["kind"] == "hang_detected"]
    print(f"frozen node excluded {excluded_after(storage, 'frozen', 'node-1'):.2f} s after")


def test_node_frozen_while_starting_is_found_without_waiting_for_the_first_step(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    # step=0: frozen as soon as its torchrun started (workers importing, joining the
    # rendezvous), where only the first-step allowance (600 s) of the hang detector applies.
    out = run(tmp_path, storage, "frozen-early", "freeze-node:node-1@step=0", spare_nodes=1)
    assert out["fingerprint"] == baseline["fingerprint"]
    first = read_state(storage, "frozen-early")["attempts"][0]
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1")
    assert "silent" in first["reason"]


def test_agents_tear_their_nodes_down_when_the_controller_falls_silent(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    # Agents judge the controller with a 1 s acceptable pause here (default 5 s), so that the
    # freeze lands while the job still trains.
    recipe = write_recipe(tmp_path, "ctl-frozen", config={**SLOW}, health={"controller_pause_s": 1})
    proc = start_launch(str(recipe), "--json", job_id="ctl-frozen", storage=storage)
    try:
        wait_for_step(storage, "ctl-frozen", 5)
        controller = int(read_state(storage, "ctl-frozen")["controller_pid"])
        os.kill(controller, signal.SIGSTOP)
        try:
            # No FIN comes from a stopped controller: each agent must judge its silence and
            # take its node down (agents, torchruns, workers: every process of the job).
            deadline = time.monotonic() + 60
            while job_processes("ctl-frozen") and time.monotonic() < deadline:
                time.sleep(0.2)
            left = job_processes("ctl-frozen")
        finally:
            os.kill(controller, signal.SIGCONT)
        assert left == [], f"processes of the job still running: {left}"
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers("ctl-frozen")
    assert proc.returncode == 0, err
    assert json.loads(out)["fingerprint"] == baseline["fingerprint"]
    first = read_state(storage, "ctl-frozen")["attempts"][0]
    assert first["cause"] == "node_fault" and first["blamed"] is None
    assert "every node was lost at once" in first["reason"]
    assert blocklist(storage, "ctl-frozen") == {}
    log = (storage / "jobs" / "ctl-frozen" / "logs" / "node-0.log").read_text()
    assert "controller silent" in log


def test_an_exception_on_every_rank_before_the_first_step_ends_the_job_at_once(
    tmp_path: Path, storage: Path
) -> None:
    recipe = write_recipe(tmp_path, "many", config={**SLOW, "layers": "many"})
    result = launch(str(recipe), "--json", job_id="many", storage=storage)
    assert result.returncode == 3, result.stderr
    state = read_state(storage, "many")
    assert len(state["attempts"]) == 1  # not three full relaunches
    assert state["attempts"][0]["cause"] == "software_error"
    assert "deterministic, not retried" in state["reason"]
    assert "ValueError" in state["reason"] and "'many'" in state["reason"]
    assert "ValueError" in result.stderr  # the user sees the exception itself
    assert blocklist(storage, "many") == {}


def test_a_node_whose_workers_keep_dying_is_blamed_the_second_time(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path,
        storage,
        "offender",
        "kill-worker:node-1@step=8",
        "kill-worker:node-1@step=18",
        spare_nodes=1,
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "offender")
    first, second, third = state["attempts"]
    # The first crash blames nobody: one crash is as likely the job's as the node's.
    assert (first["cause"], first["blamed"]) == ("worker_crash", None)
    assert "killed by SIGKILL" in first["reason"]
    assert second["nodes"] == ["node-0", "node-1"]
    assert (second["cause"], second["blamed"]) == ("node_fault", "node-1")
    assert "died of a signal 2 times" in second["reason"]
    assert third["nodes"] == ["node-0", "node-2"]
    assert "node-1" in blocklist(storage, "offender")


def test_a_rank_stuck_in_its_own_loop_is_named_from_the_stacks(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    # node-1's rank loops in Python at step 11 while the other waits for it in a collective:
    # both fall silent, both processes are running (state R/S), both at the same step. Right
    # after the step-10 checkpoint: its upload, still going, must not extend the timeout.
    out = run(
        tmp_path,
        storage,
        "spin",
        config={"spin_at_step": 11, "spin_node": "node-1"},
        spare_nodes=1,
        health={"hang_timeout_s": 4},
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    first = read_state(storage, "spin")["attempts"][0]
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1")
    assert "on node-1 is running its own code at spin_forever" in first["reason"]
    assert "wait(s) in torch" in first["reason"]
    # gloo's flight recorder, read from the ranks' debug servers while node-1's rank held the
    # GIL: node-1 never entered the collective the other rank waits in.
    assert "on node-1 never enqueued collective #" in first["reason"], first["reason"]
    stacks = storage / "jobs" / "spin" / "stacks" / "attempt-0"
    recorders = {p.name.split("-rank-")[0]: p for p in stacks.glob("*.flight_recorder.json")}
    assert set(recorders) == {"node-0", "node-1"}
    entries = json.loads(recorders["node-1"].read_text())["entries"]
    assert entries and entries[-1]["profiling_name"].startswith("gloo:")
    status = trainctl("status", "spin", storage=storage)
    assert "running its own code" in status.stdout + status.stderr


def _can_partition() -> str | None:
    """Why a partition cannot be made here (None: it can)."""
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        return "needs nft (nftables) and unshare"
    probe = subprocess.run(
        ["unshare", "--net", "nft", "add", "table", "inet", "probe"], capture_output=True
    )
    return None if probe.returncode == 0 else f"no network namespace: {probe.stderr!r}"


def node_processes(job_id: str, node: str) -> list[int]:
    needle = f"TRAINCTL_NODE={node}".encode()
    found = []
    for pid in job_processes(job_id):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_partitioned_node_is_excluded_and_tears_itself_down(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    why = _can_partition()
    if why is not None:
        pytest.skip(why)
    recipe = write_recipe(tmp_path, "cut", config={**SLOW}, spare_nodes=1)
    # The whole job in a network namespace of its own (only its loopback): the fault's
    # nftables rules drop node-1's control traffic there and nowhere else.
    command = [
        "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "--",
        "timeout", "-s", "KILL", "240", sys.executable, "-m", "trainctl.cli.main",
        "launch", "--job-id", "cut", str(recipe), "--json",
        "--fault", "partition-node:node-1@step=10",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=sealed_env(storage),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_event(storage, "cut", "fault_injected", timeout_s=120)
        cut_at = time.monotonic()
        # Nothing can kill node-1 from the controller's side now: its agent must notice the
        # silence and take down its torchrun and workers while the job goes on without it.
        while node_processes("cut", "node-1") and time.monotonic() - cut_at < 60:
            time.sleep(0.2)
        left = node_processes("cut", "node-1")
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers("cut")
    assert left == [], f"node-1 still runs {left}"
    assert proc.returncode == 0, err
    assert json.loads(out)["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "cut")
    first, second = state["attempts"]
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1")
    assert "silent" in first["reason"]
    assert second["nodes"] == ["node-0", "node-2"]
    # Attempt 1 raised the checkpoint fence: attempt 0's orphans can no longer write there.
    fence = json.loads((storage / "checkpoints" / "cut" / "fence.json").read_text())
    assert fence == {"attempt": 1}
    log = (storage / "jobs" / "cut" / "logs" / "node-1.log").read_text()
    assert "controller silent" in log


def test_no_healthy_node_is_blamed_with_every_core_saturated(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    # Unrelated busy processes, two per core, at the job's own priority, for the whole run:
    # heartbeats come late and jittery, and the detector must learn that, not convict.
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        out = run(tmp_path, storage, "loaded", spare_nodes=1)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "loaded")
    assert len(state["attempts"]) == 1 and state["attempts"][0]["cause"] is None
    assert blocklist(storage, "loaded") == {}
