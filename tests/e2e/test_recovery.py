"""End-to-end recovery: every failure ends with the weights of an uninterrupted run.

Real 2-node tiny-gpt jobs on the local scheduler (real torchrun, gloo), faults injected with
`trainctl launch --fault` (SIGKILL of a node's whole process tree, SIGKILL/SIGSTOP of a worker,
an XID through the fake libnvidia-ml.so.1, a storage outage), a real SIGTERM, a SIGKILLed
controller. After each: the final fingerprint equals the uninterrupted run's (after a shrink:
the restored weights equal the saved ones bit for bit and the final loss is within 1e-3),
no process of the job is left, no committed checkpoint is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser import check_report_page
from tests.conftest import REPO, sealed_env
from tests.e2e.conftest import BUCKET, S3
from tests.e2e.harness import (
    SLOW,
    assert_no_leftovers,
    blocklist,
    committed_steps,
    events,
    final_loss,
    kinds,
    launch,
    read_state,
    run,
    start_launch,
    trainctl,
    wait_for_step,
    workers,
    write_recipe,
)
from tests.fakenvml.build import build_or_skip
from trainctl.recipe import load_recipe, spec_to_yaml
from trainctl.recovery.journal import new_record
from trainctl.store import JobStore

pytestmark = pytest.mark.e2e


def test_worker_exception_is_retried_in_place(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(tmp_path, storage, "exc", config={"fail_at_step": 12})
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "exc")
    assert [a["cause"] for a in state["attempts"]] == ["software_error", None]
    assert state["attempts"][1]["nodes"] == ["node-0", "node-1"]
    assert state["attempts"][1]["restored_step"] == 10
    assert blocklist(storage, "exc") == {}  # a bug is never a node's fault


def test_worker_kill_9_is_a_worker_crash_relaunched_in_place(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(tmp_path, storage, "kill9", "kill-worker:node-1@step=12")
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "kill9")
    assert [a["cause"] for a in state["attempts"]] == ["worker_crash", None]
    assert blocklist(storage, "kill9") == {}


def test_node_loss_promotes_the_spare_and_excludes_the_node(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(tmp_path, storage, "spare", "kill-node:node-1@step=12", spare_nodes=1)
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "spare")
    first, second = state["attempts"]
    assert (first["cause"], first["blamed"]) == ("node_fault", "node-1")
    assert second["nodes"] == ["node-0", "node-2"] and second["world_size"] == 2
    entry = blocklist(storage, "spare")["node-1"]
    assert "node agent lost" in entry["reason"] and entry["expires_at"] > time.time()
    nodes = {n["name"]: n["state"] for n in state["nodes"]}
    assert nodes["node-1"] == "excluded"
    status = trainctl("status", "spare", storage=storage)
    assert status.returncode == 0
    assert "excluded" in status.stdout + status.stderr
    assert "node agent lost" in status.stdout + status.stderr
    # nothing committed was lost: the newest two steps are there
    assert committed_steps(storage, "spare")[-2:] == [25, 30]
    # the report of this real job reads in a real browser: a lane per attempt and node, the
    # failure labelled with its node and cause
    page = tmp_path / "spare-report.html"
    report = trainctl("report", "spare", "--out", str(page), storage=storage)
    assert report.returncode == 0, report.stderr
    lanes = [f"attempt {a['number']} · {n}" for a in state["attempts"] for n in a["nodes"]]
    check_report_page(page, tmp_path, lanes, ["node-1: node_fault"])


def test_node_loss_without_spare_shrinks_and_reshards(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    run(tmp_path, storage, "shrink", "kill-node:node-1@step=12", min_nodes=1)
    state = read_state(storage, "shrink")
    assert [a["world_size"] for a in state["attempts"]] == [2, 1]
    assert state["state"] == "succeeded" and state["final_step"] == 30
    items = events(storage, "shrink")
    restored = [e for e in items if e["kind"] == "restored_fingerprint"]
    assert len(restored) == 1
    step = restored[0]["data"]["step"]
    saved = [
        e
        for e in items
        if e["kind"] == "saved_fingerprint" and e["data"]["step"] == step and e["attempt"] == 0
    ]
    assert saved, f"no fingerprint saved at step {step}"
    # 2 ranks saved, 1 rank restored: the weights are bit for bit the saved ones
    assert restored[0]["data"]["fingerprint"] == saved[0]["data"]["fingerprint"]
    loss = final_loss(storage, "shrink")
    assert abs(loss - baseline["loss"]) <= 1e-3 * abs(baseline["loss"])


def test_hung_worker_is_localised_and_its_node_replaced(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path,
        storage,
        "hang",
        "hang:node-1@step=12",
        spare_nodes=1,
        health={"hang_timeout_s": 4},
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "hang")
    assert (state["attempts"][0]["cause"], state["attempts"][0]["blamed"]) == (
        "node_fault",
        "node-1",
    )
    assert "stopped (state T)" in blocklist(storage, "hang")["node-1"]["reason"]
    assert "stacks_saved" in kinds(storage, "hang")


def test_xid_mid_run_excludes_the_node(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    lib = build_or_skip(tmp_path / "lib")
    node_env = {}
    for i in range(3):
        fault_file = tmp_path / f"node-{i}.nvml"
        fault_file.write_text("device_count=1\n")
        node_env[f"node-{i}"] = {"FAKE_NVML_FILE": str(fault_file)}
    out = run(
        tmp_path,
        storage,
        "xid",
        "nvml-xid:node-1@step=10",
        spare_nodes=1,
        node_env=node_env,
        env={"LD_LIBRARY_PATH": str(lib)},
        health={"probe_interval_s": 0.5},
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    assert "XID 79" in blocklist(storage, "xid")["node-1"]["reason"]
    assert read_state(storage, "xid")["attempts"][1]["nodes"] == ["node-0", "node-2"]


def test_storage_outage_costs_a_checkpoint_not_the_job(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(tmp_path, storage, "outage", "storage-outage@step=8,for=2")
    assert out["fingerprint"] == baseline["fingerprint"]
    items = events(storage, "outage")
    failed = [e for e in items if e["kind"] == "checkpoint_failed"]
    assert failed and "injected storage outage" in json.dumps(failed[0]["data"])
    later = [
        e["data"]["step"]
        for e in items
        if e["kind"] == "checkpoint_committed" and e["time"] > failed[0]["time"]
    ]
    assert later and max(later) == 30
    assert len(read_state(storage, "outage")["attempts"]) == 1


def test_sigterm_preempts_with_a_checkpoint_then_resume_finishes(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    recipe = write_recipe(tmp_path, "preempt", config={**SLOW})
    proc = start_launch(str(recipe), job_id="preempt", storage=storage)
    try:
        wait_for_step(storage, "preempt", 12)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers("preempt")
    assert proc.returncode == 4
    state = read_state(storage, "preempt")
    assert state["state"] == "stopped"
    stopped_at = max(committed_steps(storage, "preempt"))
    assert stopped_at >= 12  # a checkpoint of the step the job stopped at
    result = trainctl("resume", "preempt", "--json", storage=storage, timeout_s=240)
    assert_no_leftovers("preempt")
    assert result.returncode == 0, result.stderr
    assert result.json()["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "preempt")
    assert state["attempts"][-1]["restored_step"] == stopped_at
    again = trainctl("resume", "preempt", "--json", storage=storage)
    assert again.returncode == 0 and "already succeeded" in again.stderr  # idempotent


def test_controller_killed_then_resume_finishes_without_duplicates(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    recipe = write_recipe(tmp_path, "ctl", config={**SLOW})
    proc = start_launch(str(recipe), job_id="ctl", storage=storage)
    try:
        wait_for_step(storage, "ctl", 12)
        controller = read_state(storage, "ctl")["controller_pid"]
        os.kill(controller, signal.SIGKILL)
        proc.wait(timeout=30)
        most = 0
        done = threading.Event()

        def count_workers() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, len(workers("ctl")))
                time.sleep(0.05)

        sampler = threading.Thread(target=count_workers, daemon=True)
        sampler.start()
        resumed = start_resume("ctl", storage)
        deadline = time.monotonic() + 60
        while len(read_state(storage, "ctl")["attempts"]) < 2:  # the resumed attempt began
            assert time.monotonic() < deadline and resumed.poll() is None
            time.sleep(0.1)
        # a second resume while the first runs starts nothing
        twice = trainctl("resume", "ctl", storage=storage)
        out, err = resumed.communicate(timeout=240)
        done.set()
        sampler.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers("ctl")
    assert twice.returncode == 2 and "already running" in twice.stderr, twice.stderr
    assert resumed.returncode == 0, err
    assert json.loads(out)["fingerprint"] == baseline["fingerprint"]
    assert most <= 2, f"{most} workers at once: a duplicate attempt ran"
    state = read_state(storage, "ctl")
    assert state["attempts"][0]["cause"] == "controller_lost"
    assert state["attempts"][-1]["restored_step"] is not None
    assert "job_resumed" in kinds(storage, "ctl")


def start_resume(job_id: str, storage: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *("timeout", "-s", "KILL", "240", sys.executable, "-m", "trainctl.cli.main"),
            *("resume", job_id, "--json"),
        ],
        cwd=REPO,
        env=sealed_env(storage),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_repeating_bug_is_a_crash_loop_exit_3(tmp_path: Path, storage: Path) -> None:
    recipe = write_recipe(tmp_path, "loop", config={"fail_at_step": 3, "fail_in_attempts": "all"})
    result = launch(str(recipe), job_id="loop", storage=storage)
    assert result.returncode == 3, result.stderr
    state = read_state(storage, "loop")
    assert [a["cause"] for a in state["attempts"]] == ["software_error"] * 3
    assert "crash loop" in state["reason"]
    assert "RuntimeError: injected failure at step 3" in state["reason"]
    assert blocklist(storage, "loop") == {}
    assert "job_gave_up" in kinds(storage, "loop")


def start_on_host(host: str, root: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`trainctl ARGS` as a controller on another host would run it: in a UTS namespace of
    its own whose host name is `host` (root only, as CI runs). The process is the controller
    itself (unshare and sh exec into it), so SIGKILL to its pid is a dead host's controller."""
    return subprocess.Popen(
        [
            *("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host),
            *(sys.executable, "-m", "trainctl.cli.main", *args, "--storage", root),
        ],
        cwd=REPO,
        env=sealed_env(root, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_one_controller_per_job_across_hosts_on_s3(
    tmp_path: Path, s3: S3, baseline: dict[str, Any]
) -> None:
    """Two controllers on different hosts share one s3:// store: of two racing `resume`s
    exactly one runs the job; when its host dies, the other takes the job over once the lease
    went unrenewed for its TTL, and finishes it with the weights of an uninterrupted run."""
    if os.geteuid() != 0:
        pytest.skip("a UTS namespace per controller needs root (CI runs as root)")
    root = f"s3://{BUCKET}/leased"
    recipe = write_recipe(tmp_path, "gpt", config={**SLOW}, launch={"lease_ttl_s": 3})
    store = JobStore(root, {"endpoint_url": s3.url, "key": "testing", "secret": "testing"})
    spec = load_recipe(recipe)
    store.create(new_record("leased", spec, time.time()), spec_to_yaml(spec))
    env = {**s3.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def status() -> dict[str, Any]:
        result = trainctl("status", "leased", "--json", storage=root, **env)
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = result.json()
        return data

    racing = {host: start_on_host(host, root, env, "resume", "leased") for host in ("a", "b")}
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in racing.values()):
            assert time.monotonic() < deadline, "neither controller was refused"
            time.sleep(0.1)
        loser = next(host for host, p in racing.items() if p.poll() is not None)
        winner = "b" if loser == "a" else "a"
        _, err = racing[loser].communicate()
        assert racing[loser].returncode == 2, err
        assert "already running" in err and f"on {winner}" in err
        deadline = time.monotonic() + 120
        while (status().get("step") or 0) < 12:
            assert time.monotonic() < deadline and racing[winner].poll() is None
            time.sleep(0.5)
        os.kill(racing[winner].pid, signal.SIGKILL)  # the winner's host dies
        racing[winner].wait(timeout=30)
        started = time.monotonic()
        takeover = start_on_host(loser, root, env, "resume", "leased", "--json")
        out, err = takeover.communicate(timeout=240)
    finally:
        for proc in racing.values():
            if proc.poll() is None:
                proc.kill()
        assert_no_leftovers("leased")
    assert takeover.returncode == 0, err
    assert time.monotonic() - started >= 3 * 0.9  # it waited out the lease
    assert json.loads(out)["fingerprint"] == baseline["fingerprint"]
    listed = trainctl("events", "leased", "--json", storage=root, **env).json()
    taken = [e for e in listed if e["kind"] == "lease_taken"]
    assert len(taken) == 1 and taken[0]["data"]["host"] == loser
    assert taken[0]["data"]["previous"].endswith(f"on {winner}")
    starts = [e for e in listed if e["kind"] == "attempt_started"]
    assert len(starts) == 2  # one attempt per controller run, none by the refused one
    attempts = status()["attempts"]
    assert attempts[0]["cause"] == "controller_lost" and attempts[-1]["state"] == "succeeded"
