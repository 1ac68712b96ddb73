"""What the Slurm tests run in place of trainctl (no torch: cheap and quick).

As the batch process (a rendered script ends in `exec PYTHON -m trainctl.cli.main resume ...`,
and PYTHON is a stub that execs this file with those arguments) it appends one record per run
to `$PAYLOAD_DIR/runs.jsonl` — its argv, working directory, SLURM_RESTART_COUNT, node and one
exported value — then acts by `$PAYLOAD_MODE`:

- `exit`: exit 0 at once;
- `agents`: start one agent per node of the job with `SrunNodeLauncher`, wait for them, then
  wait for `$PAYLOAD_DIR/go` and exit 0;
- `wait`: stay until told: every USR1 and TERM is recorded in `events.jsonl`; the first USR1
  of a run with restart count 1 requeues the job itself, excluding the node it ran on (as the
  controller does with a blamed node); a USR1 on restart 2 exits 0; a TERM exits 143.

As an agent (`payload.py agent ARG`) it records its node, argv and `AGENT_VALUE` in
`agent-<node>.json`, and stays until TERM if `AGENT_STAY` is set.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from trainctl.launch.slurm import SlurmClient
from trainctl.launch.slurm_nodes import SrunNodeLauncher


def record(name: str, entry: dict[str, object]) -> None:
    with open(Path(os.environ["PAYLOAD_DIR"]) / name, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def agent(args: list[str]) -> int:
    node = os.environ["SLURMD_NODENAME"]
    entry = {"node": node, "argv": args, "value": os.environ.get("AGENT_VALUE"), "pid": os.getpid()}
    path = Path(os.environ["PAYLOAD_DIR"]) / f"agent-{node}.json"
    path.write_text(json.dumps(entry))
    if not os.environ.get("AGENT_STAY"):
        return 0
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    while not stop:
        time.sleep(0.05)
    path.with_suffix(".term").write_text("TERM")
    return 0


def run_agents(job_id: str) -> int:
    client = SlurmClient()
    launcher = SrunNodeLauncher(job_id, client)
    directory = Path(os.environ["PAYLOAD_DIR"])
    for node in client.hostnames(os.environ["SLURM_JOB_NODELIST"]):
        launcher.start_agent(
            node,
            [sys.executable, __file__, "agent", "arg with $(touch PWNED) `touch PWNED` 'q' \"dq\""],
            {"AGENT_VALUE": os.environ["HOSTILE"]},
            str(directory / f"agent-{node}.log"),
        )
    codes = {node: process.wait() for node, process in launcher.agents.items()}
    record("events.jsonl", {"event": "agents", "codes": codes})
    deadline = time.monotonic() + 30
    while not (directory / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0


def wait_for_signals(job_id: str, restart: str | None) -> int:
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        record("events.jsonl", {"event": signal.Signals(signum).name, "restart": restart})

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    handled = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        while handled < len(received):
            signum = received[handled]
            handled += 1
            if signum == signal.SIGTERM:
                return 143
            if restart == "2":
                return 0
            if restart == "1":
                # What the controller does when it blames a node: requeue, excluding it. Slurm
                # sends this process SIGTERM after `requeuehold`; it is recorded, and acted on
                # only after the exclusion is set and the job released.
                SlurmClient().requeue_excluding(job_id, [os.environ["SLURMD_NODENAME"]])
                record("events.jsonl", {"event": "requeued_excluding", "restart": restart})
        time.sleep(0.05)
    return 1


def main(args: list[str]) -> int:
    if args[:1] == ["agent"]:
        return agent(args[1:])
    job_id = os.environ["SLURM_JOB_ID"]
    restart = os.environ.get("SLURM_RESTART_COUNT")
    record(
        "runs.jsonl",
        {
            "argv": args,
            "cwd": os.getcwd(),
            "restart": restart,
            "node": os.environ.get("SLURMD_NODENAME"),
            "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
            "hostile": os.environ.get("HOSTILE"),
            "pid": os.getpid(),
        },
    )
    mode = os.environ["PAYLOAD_MODE"]
    if mode == "agents":
        return run_agents(job_id)
    if mode == "wait":
        return wait_for_signals(job_id, restart)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
