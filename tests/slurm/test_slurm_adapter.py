"""The Slurm adapter and the rendered batch script on a real Slurm 22.05 cluster (n1..n4).

The rendered script's `python` is a stub that runs tests/slurm/payload.py instead of trainctl,
from a directory whose name, like the job name, the paths and the values, holds spaces, quotes,
`$(...)` and backticks: they must reach Slurm and the payload verbatim, and nothing may run.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from tests.slurm.cluster import LocalSlurmCluster
from trainctl.launch.sbatch import SbatchScript, SlurmOptions, render_sbatch
from trainctl.launch.slurm import SlurmClient, SlurmJobView
from trainctl.launch.slurm_nodes import SrunNodeLauncher

PAYLOAD = Path(__file__).with_name("payload.py")
HOSTILE = "a b $(touch PWNED) `touch PWNED` 'single' \"double\" \\back $HOME ; # % end"
HOSTILE_DIR = "dir $(touch PWNED) `touch PWNED` 'q' \"dq\" %j #"

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 30.0) -> T:
    """Poll `probe` every 0.2 s until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def wait_state(
    slurm: SlurmClient, job: str, states: tuple[str, ...], timeout_s: float = 30.0
) -> SlurmJobView:
    seen: list[str] = []

    def probe() -> SlurmJobView | None:
        view = slurm.job_view(job)
        assert view is not None, f"Slurm forgot job {job}"
        if not seen or seen[-1] != view.state:
            seen.append(view.state)
        return view if view.state in states else None

    try:
        return wait_for(f"job {job} in {states}", probe, timeout_s)
    except AssertionError as error:
        raise AssertionError(f"{error}; states seen: {seen}") from None


class Payload:
    """A results directory, the stub `python` that runs the payload, and what it recorded."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / HOSTILE_DIR
        self.results = self.root / "results"
        self.results.mkdir(parents=True)
        self.python = self.root / "python"
        self.python.write_text(
            f'#!/bin/bash\nexec {shlex.quote(sys.executable)} {shlex.quote(str(PAYLOAD))} "$@"\n'
        )
        self.python.chmod(0o755)
        self.workdir = self.root / "work"
        self.workdir.mkdir()

    def script(
        self,
        job_id: str,
        mode: str,
        nodes: int,
        *,
        job_name: str | None = None,
        exclude: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> SbatchScript:
        return render_sbatch(
            job_id,
            job_name or f"trainctl-{job_id}",
            nodes,
            SlurmOptions(extra_args=tuple(extra_args), signal_grace_s=60),
            exclude=exclude,
            python=str(self.python),
            storage_root=str(self.root / "store $(touch PWNED)"),
            workdir=str(self.workdir),
            log_path=str(self.root / "logs" / f"{job_id} batch %j.log"),
            env={"PAYLOAD_DIR": str(self.results), "PAYLOAD_MODE": mode, "HOSTILE": HOSTILE},
        )

    def runs(self) -> list[dict[str, object]]:
        return self._lines("runs.jsonl")

    def events(self) -> list[dict[str, object]]:
        return self._lines("events.jsonl")

    def _lines(self, name: str) -> list[dict[str, object]]:
        path = self.results / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def nothing_executed(self, tmp_path: Path) -> None:
        for where in (tmp_path, Path.cwd(), Path("/")):
            assert not list(where.glob("**/PWNED" if where == tmp_path else "PWNED")), (
                f"a hostile value was executed (PWNED under {where})"
            )


@pytest.fixture
def payload(tmp_path: Path) -> Iterator[Payload]:
    """The test's payload; afterwards, proof that no hostile value was executed."""
    payload = Payload(tmp_path)
    yield payload
    payload.nothing_executed(tmp_path)


@pytest.mark.timeout(90)
def test_batch_script_runs_agents_on_every_node_verbatim(
    slurm: SlurmClient, payload: Payload
) -> None:
    """PENDING (held) -> RUNNING -> COMPLETED; hostile values arrive verbatim; one agent per
    node through srun."""
    name = "job " + HOSTILE
    script = payload.script("job-a", "agents", 2, job_name=name, extra_args=["--hold"])
    job = slurm.submit(script)
    assert Path(script.script_path).read_text() == script.text

    held = wait_state(slurm, job, ("PENDING",))
    assert held.name == name
    assert held.reason == "JobHeldUser"
    assert held.meaning.active and held.batch_host is None
    slurm.release(job)

    running = wait_state(slurm, job, ("RUNNING",))
    assert len(running.nodes) == 2 and running.batch_host == running.nodes[0]
    assert "RUNNING on" in running.describe()
    wait_for(
        "the agents to finish", lambda: [e for e in payload.events() if e["event"] == "agents"]
    )
    (payload.results / "go").touch()
    done = wait_state(slurm, job, ("COMPLETED",))
    assert not done.meaning.active and done.restart_count == 0

    [run] = payload.runs()
    assert run["argv"] == [
        "-m",
        "trainctl.cli.main",
        "resume",
        "job-a",
        "--storage",
        str(payload.root / "store $(touch PWNED)"),
    ]
    assert run["restart"] is None, "SLURM_RESTART_COUNT is unset on the first run"
    assert run["cwd"] == str(payload.workdir)
    assert run["hostile"] == HOSTILE
    assert run["node"] == running.batch_host
    [event] = [e for e in payload.events() if e["event"] == "agents"]
    assert event["codes"] == {node: 0 for node in running.nodes}
    for node in running.nodes:
        agent = json.loads((payload.results / f"agent-{node}.json").read_text())
        assert agent["node"] == node
        assert agent["argv"] == ["arg with $(touch PWNED) `touch PWNED` 'q' \"dq\""]
        assert agent["value"] == HOSTILE
    log = payload.root / "logs" / "job-a batch %j.log"
    assert f"trainctl: batch script on {running.batch_host}" in log.read_text()


@pytest.mark.timeout(90)
def test_excluded_and_drained_nodes_are_never_used(slurm: SlurmClient, payload: Payload) -> None:
    # --exclude at submission.
    job = slurm.submit(payload.script("job-x", "exit", 2, exclude=["n1", "n2"]))
    view = wait_state(slurm, job, ("COMPLETED",))
    assert view.nodes == ("n3", "n4") and view.exc_nodes == ("n1", "n2")

    # ExcNodeList set while pending (held), as before a requeue.
    job = slurm.submit(payload.script("job-y", "exit", 2, extra_args=["--hold"]))
    wait_state(slurm, job, ("PENDING",))
    slurm.update_exclude(job, ["n2", "n3"])
    slurm.release(job)
    view = wait_state(slurm, job, ("COMPLETED",))
    assert view.nodes == ("n1", "n4") and view.exc_nodes == ("n2", "n3")

    # A drained node takes no new job, even when the job could use every node.
    slurm.drain("n1", "xid 79 $(touch PWNED)")
    assert "DRAIN" in slurm.node_state("n1")
    job = slurm.submit(payload.script("job-z", "exit", 3))
    view = wait_state(slurm, job, ("COMPLETED",))
    assert view.nodes == ("n2", "n3", "n4")
    job = slurm.submit(payload.script("job-w", "exit", 4))
    time.sleep(2)
    view = wait_state(slurm, job, ("PENDING",))
    assert view.reason not in ("", "None"), view
    assert view.nodes == ()
    slurm.cancel(job)
    assert wait_state(slurm, job, ("CANCELLED",)).meaning.active is False
    assert slurm.node_address("n2") == "127.0.0.1"
    assert slurm.hostnames("n[1-3],n4") == ["n1", "n2", "n3", "n4"]


@pytest.mark.timeout(120)
def test_requeue_usr1_and_requeue_excluding_from_inside(
    slurm: SlurmClient, payload: Payload
) -> None:
    """scontrol requeue -> restart 1; USR1 (--full) reaches the batch process, which requeues
    itself excluding its node -> restart 2 elsewhere; USR1 (--batch) -> it exits 0."""
    job = slurm.submit(payload.script("job-r", "wait", 2))
    wait_state(slurm, job, ("RUNNING",))
    wait_for("the first run", payload.runs)

    slurm.requeue(job)
    wait_for("the second run", lambda: len(payload.runs()) == 2)
    first, second = payload.runs()
    assert (first["restart"], second["restart"]) == (None, "1")
    assert {"event": "SIGTERM", "restart": None} in payload.events()
    view = wait_state(slurm, job, ("RUNNING",))
    assert view.restart_count == 1

    blamed = str(second["node"])
    slurm.send_signal(job, "USR1", target="full")
    wait_for("the third run", lambda: len(payload.runs()) == 3, timeout_s=40)
    third = payload.runs()[2]
    assert third["restart"] == "2"
    events = payload.events()
    assert {"event": "SIGUSR1", "restart": "1"} in events
    assert {"event": "requeued_excluding", "restart": "1"} in events
    view = wait_state(slurm, job, ("RUNNING",))
    assert view.exc_nodes == (blamed,)
    assert blamed not in view.nodes and third["node"] != blamed

    slurm.send_signal(job, "USR1", target="batch")
    view = wait_state(slurm, job, ("COMPLETED",))
    assert view.restart_count == 2


@pytest.mark.timeout(90)
def test_srun_launcher_stops_one_node_gently_and_one_hard(
    slurm: SlurmClient, payload: Payload
) -> None:
    job = slurm.submit(payload.script("job-s", "wait", 2))
    view = wait_state(slurm, job, ("RUNNING",))
    launcher = SrunNodeLauncher(job, slurm)
    gentle, hard = view.nodes
    for node in view.nodes:
        launcher.start_agent(
            node,
            [sys.executable, str(PAYLOAD), "agent", "x"],
            {"AGENT_STAY": "1", "PAYLOAD_DIR": str(payload.results), "AGENT_VALUE": "v"},
            str(payload.results / f"agent-{node}.log"),
        )
    agents = {
        node: wait_for(f"the agent on {node}", partial(_read_json, payload.results, node))
        for node in view.nodes
    }
    steps = launcher.steps()
    assert set(steps) == set(view.nodes), steps
    assert launcher.poll(gentle) is None

    assert launcher.kill_agent(gentle, grace_s=10) == 0
    assert (payload.results / f"agent-{gentle}.term").exists(), "the agent got TERM first"
    assert launcher.poll(hard) is None, "the other node's agent still runs"

    code = launcher.kill_agent(hard)
    assert code not in (None, 0)
    assert not (payload.results / f"agent-{hard}.term").exists(), "killed, not asked"
    for node, agent in agents.items():
        assert not Path(f"/proc/{agent['pid']}").exists(), f"agent on {node} left behind"
    assert launcher.steps() == {}
    slurm.cancel(job)
    wait_state(slurm, job, ("CANCELLED", "COMPLETED"))


def _read_json(results: Path, node: str) -> dict[str, object] | None:
    """What the agent on `node` recorded, once it has."""
    try:
        return json.loads((results / f"agent-{node}.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.timeout(150)
def test_crashed_node_requeues_the_job_onto_the_others(
    slurm: SlurmClient, slurm_cluster: LocalSlurmCluster, payload: Payload
) -> None:
    """A dead host (slurmd and every process on it gone): Slurm marks it DOWN after its
    timeout and requeues the job, which runs again, on the other nodes, with restart 1."""
    job = slurm.submit(payload.script("job-c", "wait", 3))
    view = wait_state(slurm, job, ("RUNNING",))
    [first] = wait_for("the first run", payload.runs)
    crashed = str(view.batch_host)
    killed = slurm_cluster.crash_node(crashed)
    try:
        assert first["pid"] in killed, "the batch process died with its host"
        wait_for(f"{crashed} DOWN", lambda: "DOWN" in slurm.node_state(crashed), timeout_s=60)
        wait_for("the second run", lambda: len(payload.runs()) == 2, timeout_s=30)
        second = payload.runs()[1]
        assert second["restart"] == "1"
        assert second["node"] != crashed
        view = wait_state(slurm, job, ("RUNNING",))
        assert view.restart_count == 1 and crashed not in view.nodes
    finally:
        slurm_cluster.restart_node(crashed)
        wait_for(
            f"{crashed} back in service",
            lambda: not {"DOWN", "NOT_RESPONDING"} & set(slurm.node_state(crashed).split("+")),
            timeout_s=30,
        )
