"""Two measurements of benchmarks/scale.py that need no simulated nodes.

- `events_bench`: a job with 100,000 events written by the real `JobStore`, then `trainctl
  status`, `events` and `report` on it (targets: status < 1 s, events and report < 5 s).
- `rdzv_bench`: torchrun's c10d rendezvous on a TCPStore hosted as the controller hosts it
  (`controller.start_rendezvous_store`), under N clients multiplexed on threads of one
  process (each its own TCPStore connection), doing the dynamic rendezvous's key pattern
  (`torch.distributed.elastic.rendezvous.c10d_rendezvous_backend`): the whole rendezvous state
  is one key, read with `get` and written with `compare_set` (base64 of a pickle naming every
  participant, so each write carries O(N) bytes and contends with every other join), then
  polled until every node joined.
"""

from __future__ import annotations

import base64
import pickle
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
        "status_s": _cli(storage, "status", job),
        "events_s": _cli(storage, "events", job),
        "report_s": _cli(storage, "report", job),
    }
    row["targets_met"] = row["status_s"] < 1 and row["events_s"] < 5 and row["report_s"] < 5
    print(
        f"{count} events (written in {written:.1f} s): status {row['status_s']:.2f} s "
        f"(target < 1), events {row['events_s']:.2f} s (target < 5), report "
        f"{row['report_s']:.2f} s (target < 5); targets_met={row['targets_met']}",
        flush=True,
    )
    return row


def _state(participants: dict[str, int]) -> bytes:
    return base64.b64encode(pickle.dumps({"round": 0, "participants": participants}))


def rdzv_once(nodes: int) -> dict[str, Any]:
    """One full rendezvous of `nodes` clients; returns its time and store traffic."""
    import torch.distributed as dist

    from trainctl.recovery.controller import start_rendezvous_store

    master, port = start_rendezvous_store("127.0.0.1")
    key = "torch.rendezvous.scale"
    clients = [
        dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=600))
        for _ in range(nodes)
    ]
    master.set(key, _state({}))
    counters = {"ops": 0, "bytes": 0, "conflicts": 0}
    lock = threading.Lock()
    done = threading.Barrier(nodes + 1)

    def join(index: int) -> None:
        try:
            join_round(index)
        except BaseException:
            done.abort()  # the main thread's wait fails instead of hanging
            raise

    def join_round(index: int) -> None:
        store, name, ops, moved, conflicts = clients[index], f"node-{index}", 0, 0, 0
        while True:
            current = store.get(key)
            participants = pickle.loads(base64.b64decode(current))["participants"]
            new = _state({**participants, name: len(participants)})
            got = store.compare_set(key, current, new)
            ops, moved = ops + 2, moved + len(current) + len(new) + len(got)
            if got == new:
                break
            conflicts += 1
        while True:  # wait for the round to fill up, polling the state
            current = store.get(key)
            ops, moved = ops + 1, moved + len(current)
            if len(pickle.loads(base64.b64decode(current))["participants"]) >= nodes:
                break
            time.sleep(0.05)
        with lock:
            counters["ops"] += ops
            counters["bytes"] += moved
            counters["conflicts"] += conflicts
        done.wait()

    started = time.perf_counter()
    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(nodes)]
    for thread in threads:
        thread.start()
    done.wait()
    elapsed = time.perf_counter() - started
    for thread in threads:
        thread.join()
    clients.clear()
    return {"nodes": nodes, "rendezvous_s": elapsed, **counters}


def rdzv_bench(sizes: list[int], repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    for nodes in sizes:
        runs = [rdzv_once(nodes) for _ in range(repeats)]
        row = {
            "nodes": nodes,
            "rendezvous_s": statistics.median(r["rendezvous_s"] for r in runs),
            "ops": statistics.median(r["ops"] for r in runs),
            "mbytes": statistics.median(r["bytes"] for r in runs) / 1e6,
            "conflicts": statistics.median(r["conflicts"] for r in runs),
        }
        print(
            f"rendezvous N={nodes}: {row['rendezvous_s']:.2f} s to a full round (median of "
            f"{repeats}); {row['ops']:.0f} store ops, {row['mbytes']:.1f} MB through the "
            f"store, {row['conflicts']:.0f} compare_set conflicts",
            flush=True,
        )
        rows.append(row)
    return rows
