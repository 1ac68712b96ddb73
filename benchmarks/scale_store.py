"""Two measurements of benchmarks/scale.py that need no simulated nodes.

- `events_bench`: a job with 100,000 events written by the real `JobStore`, then `trainctl
  status`, `events` (the newest page, a kind, `--all`), `report` and `top --once` on it
  (targets: status < 1 s, events and report < 5 s), beside the floor: listing the directory
  and reading every file's bytes.
- `rdzv_bench`: torchrun's c10d rendezvous on a TCPStore hosted as the controller hosts it
  (`rendezvous.start_rendezvous_store`), under N clients (each its own TCPStore connection, as
  each node's agent has one) multiplexed on threads of a few spawned processes, doing the
  dynamic rendezvous's key pattern (`torch.distributed.elastic.rendezvous`): a first join
  skewed by 0-0.3 s, the whole rendezvous state in one key read with `get` and written with
  `compare_set` (base64 of a pickle naming every participant, so each write carries O(N) bytes
  and contends with every other join), then polled every second (torch's ``_delay(1)``) until
  every node joined. Clients connect from several processes at once because every TCPStore
  connect does reverse-DNS lookups of the peer (strace: PTR queries for 1.0.0.127.in-addr.arpa
  to the resolver, from client and server), and on this VM about one lookup in 25 goes
  unanswered: a 5 s resolver timeout, so one process connects about 5 clients a second
  however many it holds (1,024 in 201 s, every 25th connect 5.0 s, the others about 1 ms).
"""

from __future__ import annotations

import base64
import multiprocessing
import pickle
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from trainctl.events import Event, FirstStep, NodeStarted
from trainctl.recovery.journal import new_record
from trainctl.spec import JobSpec
from trainctl.store import JobStore


def _cli(storage: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trainctl.cli.main", *args, "--storage", str(storage)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=600,
    )
    return time.perf_counter() - started


def read_floor_s(directory: Path) -> float:
    """The physical floor for a command that reads every event: list the directory and read
    every file's bytes with plain ``os.read``, nothing parsed."""
    import os

    started = time.perf_counter()
    for name in os.listdir(directory):
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def events_bench(root: Path, count: int) -> dict[str, Any]:
    storage, job = root / "events-store", "many-events"
    store = JobStore(str(storage))
    store.check_root(True)
    spec = JobSpec.model_validate({"name": "many", "script": __file__, "nodes": 1024})
    now = time.time()
    store.create(new_record(job, spec, now), "name: many\n")
    started = time.perf_counter()
    for i in range(count):
        data = NodeStarted(agent_pid=i, torchrun_pid=i) if i % 2 else FirstStep(step=i)
        store.append_event(job, Event(now + i * 0.01, f"event {i}", data))
    written = time.perf_counter() - started
    row = {
        "events": count,
        "write_s": written,
        "read_floor_s": read_floor_s(storage / "jobs" / job / "events"),
        "status_s": _cli(storage, "status", job),
        "events_s": _cli(storage, "events", job),
        "events_kind_s": _cli(storage, "events", job, "--kind", "first_step", "-n", "50"),
        "events_all_s": _cli(storage, "events", job, "--all"),
        "report_s": _cli(storage, "report", job),
        "top_s": _cli(storage, "top", job, "--once"),
    }
    row["targets_met"] = row["status_s"] < 1 and row["events_s"] < 5 and row["report_s"] < 5
    print(
        f"{count} events (written in {written:.1f} s; listing + reading every file's bytes, "
        f"the floor for reading them all: {row['read_floor_s']:.2f} s): status "
        f"{row['status_s']:.2f} s (target < 1), events (newest page) {row['events_s']:.2f} s "
        f"(target < 5), events --kind first_step -n 50 {row['events_kind_s']:.2f} s, events "
        f"--all (streamed) {row['events_all_s']:.2f} s, report {row['report_s']:.2f} s "
        f"(target < 5), top --once {row['top_s']:.2f} s; targets_met={row['targets_met']}",
        flush=True,
    )
    return row


def _state(participants: dict[str, int]) -> bytes:
    return base64.b64encode(pickle.dumps({"round": 0, "participants": participants}))


RDZV_KEY = "torch.rendezvous.scale"
POLL_S = 1.0
"""How often a joined node re-reads the state (torch's dynamic rendezvous: ``_delay(1)``)."""
SKEW_S = 0.3
"""A node's first join is delayed by up to this (torch's round-0 ``_delay((0, 0.3))``)."""
CLIENTS_PER_PROCESS = 64


def _join_round(store: Any, name: str, nodes: int) -> tuple[int, int, int]:
    """One node's join: compare_set itself into the state until it wins, then poll until the
    round is full. Returns (store ops, bytes moved, conflicts)."""
    ops = moved = conflicts = 0
    time.sleep(random.uniform(0, SKEW_S))
    while True:
        current = store.get(RDZV_KEY)
        participants = pickle.loads(base64.b64decode(current))["participants"]
        new = _state({**participants, name: len(participants)})
        got = store.compare_set(RDZV_KEY, current, new)
        ops, moved = ops + 2, moved + len(current) + len(new) + len(got)
        if got == new:
            break
        conflicts += 1
    while True:
        current = store.get(RDZV_KEY)
        ops, moved = ops + 1, moved + len(current)
        if len(pickle.loads(base64.b64decode(current))["participants"]) >= nodes:
            return ops, moved, conflicts
        time.sleep(POLL_S)


def _clients(port: int, first: int, count: int, nodes: int) -> None:
    """A spawned process holding `count` node clients: connect them all, report, wait for
    ``go``, run their joins on threads, add their traffic to the store's counters."""
    import torch.distributed as dist

    def connect() -> Any:
        return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=600))

    control, lock = connect(), threading.Lock()
    clients = [connect() for _ in range(count)]
    control.add("connected", count)
    control.wait(["go"])

    def join(index: int) -> None:
        ops, moved, conflicts = _join_round(clients[index], f"node-{first + index}", nodes)
        with lock:
            control.add("ops", ops)
            control.add("bytes", moved)
            control.add("conflicts", conflicts)
            if control.add("seen", 1) == nodes:
                control.set("round_done", repr(time.time()))

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def rdzv_once(nodes: int) -> dict[str, Any]:
    """One full rendezvous of `nodes` clients in ceil(nodes / 64) processes; its time (``go`` ->
    the last node saw the full round), the store traffic, and how long connecting took."""
    from trainctl.recovery.rendezvous import start_rendezvous_store

    master, port = start_rendezvous_store("127.0.0.1")
    master.set(RDZV_KEY, _state({}))
    spawn = multiprocessing.get_context("spawn")  # never fork after a TCPStore exists
    started = time.perf_counter()
    processes = []
    for first in range(0, nodes, CLIENTS_PER_PROCESS):
        count = min(CLIENTS_PER_PROCESS, nodes - first)
        process = spawn.Process(target=_clients, args=(port, first, count, nodes), daemon=True)
        process.start()
        processes.append(process)
    try:
        while master.add("connected", 0) < nodes:
            if any(p.exitcode not in (None, 0) for p in processes):
                raise RuntimeError("a client process died while connecting")
            time.sleep(0.2)
        connected_s = time.perf_counter() - started
        go = time.time()
        master.set("go", "1")
        master.wait(["round_done"], timedelta(seconds=600))
        elapsed = float(master.get("round_done").decode()) - go
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    counters = {k: master.add(k, 0) for k in ("ops", "bytes", "conflicts")}
    return {
        "nodes": nodes,
        "processes": len(processes),
        "connect_s": connected_s,
        "rendezvous_s": elapsed,
        **counters,
    }


def rdzv_bench(sizes: list[int], repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    for nodes in sizes:
        runs = [rdzv_once(nodes) for _ in range(repeats)]
        row = {
            "nodes": nodes,
            "processes": runs[0]["processes"],
            "connect_s": statistics.median(r["connect_s"] for r in runs),
            "rendezvous_s": statistics.median(r["rendezvous_s"] for r in runs),
            "ops": statistics.median(r["ops"] for r in runs),
            "mbytes": statistics.median(r["bytes"] for r in runs) / 1e6,
            "conflicts": statistics.median(r["conflicts"] for r in runs),
        }
        print(
            f"rendezvous N={nodes} ({row['processes']} client processes): "
            f"{row['rendezvous_s']:.2f} s to a full round (median of {repeats}; torch polls "
            f"every {POLL_S:g} s, so a round is at least one poll); {row['ops']:.0f} store "
            f"ops, {row['mbytes']:.1f} MB through the store, {row['conflicts']:.0f} "
            f"compare_set conflicts; connecting the clients took {row['connect_s']:.1f} s",
            flush=True,
        )
        rows.append(row)
    return rows
