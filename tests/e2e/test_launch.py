"""End-to-end: real 2-node jobs on the local scheduler (real torchrun, gloo, FSDP2)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.harness import (
    assert_no_leftovers,
    job_processes,
    launch,
    read_state,
    start_launch,
    trainctl,
    wait_for_step,
)

pytestmark = pytest.mark.e2e

TINY = str(REPO / "recipes" / "tiny-gpt.yaml")
DCN = str(REPO / "recipes" / "dcnv2.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tiny_gpt_two_nodes_succeeds_and_records_fingerprint(storage: Path) -> None:
    port = free_port()
    result = launch(
        TINY,
        *("--nodes", "2", "--max-steps", "6", "--rdzv-port", str(port)),
        job_id="gpt-a",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gpt-a"
    status = trainctl("status", "gpt-a", "--json", storage=storage)
    assert status.returncode == 0
    data = status.json()
    assert data["state"] == "succeeded"
    assert data["final_step"] == 6
    assert len(data["fingerprint"]) == 64
    assert [n["name"] for n in data["nodes"]] == ["node-0", "node-1"]
    assert all(n["state"] == "succeeded" for n in data["nodes"])
    assert len(data["attempts"]) == 1 and data["attempts"][0]["world_size"] == 2
    listed = trainctl("events", "gpt-a", "--json", storage=storage).json()
    kinds = [e["kind"] for e in listed]
    assert kinds[0] == "job_created" and kinds[-1] == "job_succeeded"
    # --rdzv-port is where the rendezvous store listened, and every node's torchrun went
    started = next(e for e in listed if e["kind"] == "attempt_started")
    assert started["data"]["rdzv"] == f"127.0.0.1:{port}"
    plan = (storage / "jobs" / "gpt-a" / "attempt-0" / "plan.json").read_text()
    assert plan.count(f"--rdzv-endpoint=127.0.0.1:{port}") == 2
    assert "result" in kinds and kinds.count("node_exited") == 2
    # Same seed, same steps -> same weights, even with a different node/worker split.
    again = launch(
        TINY,
        "--nodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-steps",
        "6",
        job_id="gpt-b",
        storage=storage,
    )
    assert again.returncode == 0, again.stderr
    assert read_state(storage, "gpt-b")["fingerprint"] == data["fingerprint"]
    listing = trainctl("list", "--json", storage=storage).json()
    assert {j["job_id"] for j in listing} == {"gpt-a", "gpt-b"}


def test_different_seed_gives_different_fingerprint(storage: Path) -> None:
    a = launch(TINY, "--nodes", "2", "--max-steps", "3", job_id="seed-0", storage=storage)
    b = launch(
        TINY, "--nodes", "2", "--max-steps", "3", "--seed", "1", job_id="seed-1", storage=storage
    )
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert (
        read_state(storage, "seed-0")["fingerprint"] != read_state(storage, "seed-1")["fingerprint"]
    )


def test_dcnv2_two_nodes_json_result(storage: Path) -> None:
    result = launch(
        DCN, "--nodes", "2", "--max-steps", "8", "--json", job_id="dcn", storage=storage
    )
    assert result.returncode == 0, result.stderr
    data = result.json()
    assert data["job_id"] == "dcn" and data["state"] == "succeeded" and data["exit_code"] == 0
    assert data["final_step"] == 8 and len(data["fingerprint"]) == 64


def test_plain_torchrun_script_runs_unmodified(storage: Path) -> None:
    script = str(REPO / "tests" / "e2e" / "scripts" / "plain_ddp.py")
    result = launch(script, "--nodes", "2", "--", "--flag", "x y", job_id="plain", storage=storage)
    assert result.returncode == 0, result.stderr
    state = read_state(storage, "plain")
    assert state["state"] == "succeeded" and state["fingerprint"] is None
    logs = "".join(p.read_text() for p in (storage / "jobs" / "plain" / "logs").glob("*.log"))
    assert "plain rank 0/2 done after 5 steps, args=['--flag', 'x y']" in logs
    assert "plain rank 1/2 done" in logs


def test_a_bug_is_a_crash_loop_and_the_job_gives_up(storage: Path) -> None:
    script = str(REPO / "tests" / "e2e" / "scripts" / "plain_ddp.py")
    # A bad step count makes every worker raise ValueError before training, every time.
    result = launch(
        script, "--nodes", "2", job_id="crash", storage=storage, PLAIN_STEPS="not-a-number"
    )
    assert result.returncode == 3, result.stderr
    state = read_state(storage, "crash")
    assert state["state"] == "failed"
    assert "crash loop: the same failure 3 times" in state["reason"]
    # A plain script writes no error file (no @record, no trainctl.runtime): the exception is
    # read from the end of its stderr, and shown with where it was raised.
    assert [a["cause"] for a in state["attempts"]] == ["software_error"] * 3
    assert "ValueError: invalid literal for int() with base 10: 'not-a-number'" in state["reason"]
    assert "plain_ddp.py:17 in main" in state["reason"]
    assert "ValueError: invalid literal" in result.stderr  # the user sees the exception
    # a software error is never a node's fault
    assert all(n["state"] != "excluded" for n in state["nodes"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_whole_tree(storage: Path, sig: signal.Signals) -> None:
    job = f"stop-{sig.name.lower()}"
    proc = start_launch(TINY, "--nodes", "2", "--max-steps", "100000", job_id=job, storage=storage)
    try:
        wait_for_step(storage, job, 2)
        assert len(job_processes(job)) >= 4  # 2 agents + 2 torchrun + 2 workers
        proc.send_signal(sig)
        sent = time.monotonic()
        proc.wait(timeout=30)
        deadline = sent + 10
        while job_processes(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not job_processes(job), "processes survived 10 s after the signal"
    finally:
        if proc.poll() is None:
            proc.kill()
        assert_no_leftovers(job)
    expected = 4 if sig == signal.SIGTERM else 1
    assert proc.returncode == expected, proc.stderr.read() if proc.stderr else ""
    state = read_state(storage, job)
    assert state["state"] == "stopped"
    assert all(n["state"] == "stopped" for n in state["nodes"])
