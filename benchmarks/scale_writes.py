"""Store writes per event: the files and bytes the controller's journal writes for each kind
of event, at each job size, through the real `Journal` on a real local `JobStore`.

For each N (plus 2 spares): a job created as `trainctl launch` creates it, then the journal's
calls the controller makes, one event at a time: an attempt starting on N nodes, every node
reported running, a progress interval (every node's step and the attempt's last step moved),
one node lost, its exclusion, the attempt's end. Before each event every file under the job
is stamped with mtime 0; a file written by the event is one whose mtime is not 0 afterwards
(a rename or a new file). Measured: files and bytes written, and of those the record's
(``state.json`` and its pieces: node shards, attempts).

The target (issue 18): per event O(1), flat across N, for a node lost, an exclusion, an
attempt's end and a progress interval. An attempt's start (N nodes move, N names in its node
list) and every node's running report are O(N) by nature; they are shown per node.

    python benchmarks/scale_writes.py [--nodes 128 512 1024 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainctl.recovery.journal import Journal  # noqa: E402
from trainctl.recovery.placement import Exclusion, NodeSelection  # noqa: E402
from trainctl.state import AttemptState, JobRecord, NodeRecord, NodeState  # noqa: E402
from trainctl.store import JobStore  # noqa: E402

SPARES = 2
FLAT = ("node_lost", "exclusion", "attempt_end", "progress")
"""The events whose writes must not grow with N."""
PER_NODE = ("attempt_start", "all_running")
"""The events that move every node: shown per node."""
FLAT_SLACK = 1.25
"""How much more the largest N may write than the smallest for an event to count as flat."""
RECORD = ("state.json", "node-shards", "attempts")


def _stamp(job_dir: Path) -> None:
    for path in job_dir.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(0, 0))


def _written(job_dir: Path) -> dict[str, int]:
    files = [p for p in job_dir.rglob("*") if p.is_file() and p.stat().st_mtime_ns != 0]
    record = [p for p in files if p.relative_to(job_dir).parts[0] in RECORD]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "record_files": len(record),
        "record_bytes": sum(p.stat().st_size for p in record),
    }


def measure(job_dir: Path, event: Callable[[], Any]) -> dict[str, int]:
    _stamp(job_dir)
    event()
    return _written(job_dir)


def one_size(nodes: int, root: Path) -> dict[str, dict[str, int]]:
    """Each event's writes for a job of `nodes` nodes (plus spares)."""
    store = JobStore(str(root / f"n{nodes}"))
    job = f"writes-{nodes}"
    names = [f"node-{i}" for i in range(nodes + SPARES)]
    now = time.time()
    record = JobRecord(job, "writes", created_at=now, updated_at=now)
    record.nodes = [NodeRecord(name) for name in names]
    for spare in record.nodes[nodes:]:
        spare.state = NodeState.SPARE
    store.create(record, "name: writes\nscript: /x.py\n")
    journal = Journal(store, record)
    journal.save_state()  # a journal's first write is whole, as on a controller's start
    job_dir = Path(store.job_url(job))
    active = tuple(names[:nodes])
    out: dict[str, dict[str, int]] = {}

    def start() -> None:
        journal.start_attempt(NodeSelection(active), nodes * 8, "127.0.0.1:1", [], None)

    def running() -> None:
        for name in active:
            record.node(name).move(NodeState.RUNNING)
        journal.save_state()

    def progress() -> None:
        for name in active:
            record.node(name).step = (record.node(name).step or 0) + 1
        record.step = (record.step or 0) + 1
        record.attempts[-1].last_step, record.attempts[-1].last_step_at = record.step, time.time()
        journal.changed()
        journal.save_state()

    def lost() -> None:
        record.node("node-7").move(NodeState.FAILED, "connection reset")
        journal.save_state()

    def exclusion() -> None:
        t = time.time()
        journal.exclude(Exclusion("node-7", "connection reset", "node_fault", t, t + 600))
        journal.save_state()

    def end() -> None:
        journal.end_attempt(
            AttemptState.FAILED,
            "node-7 lost",
            exit_code=None,
            cause="node_fault",
            blamed="node-7",
            failed_at=None,
            decided_at=time.time(),
        )

    for name, event in (
        ("attempt_start", start),
        ("all_running", running),
        ("progress", progress),
        ("node_lost", lost),
        ("exclusion", exclusion),
        ("attempt_end", end),
    ):
        out[name] = measure(job_dir, event)
    return out


def flat(rows: dict[int, dict[str, dict[str, int]]]) -> dict[str, bool]:
    """Per O(1) event: whether the largest N wrote at most `FLAT_SLACK` times the smallest."""
    sizes = sorted(rows)
    small, large = rows[sizes[0]], rows[sizes[-1]]
    return {e: large[e]["bytes"] <= FLAT_SLACK * small[e]["bytes"] for e in FLAT}


def run(sizes: list[int], root: Path) -> dict[str, Any]:
    rows = {n: one_size(n, root) for n in sizes}
    return {"rows": rows, "flat": flat(rows) if len(sizes) > 1 else {}}


def print_writes(result: dict[str, Any]) -> None:
    rows: dict[int, dict[str, dict[str, int]]] = result["rows"]
    for event in (*FLAT, *PER_NODE):
        cells = []
        for nodes, row in sorted(rows.items()):
            w = row[event]
            per = f", {w['bytes'] / nodes:.0f} B/node" if event in PER_NODE else ""
            cells.append(
                f"N={nodes}: {w['files']} files {w['bytes']} B "
                f"(record {w['record_files']} files {w['record_bytes']} B{per})"
            )
        verdict = result["flat"].get(event)
        target = (
            f"target O(1), flat across N: {'met' if verdict else 'NOT met'}"
            if event in FLAT and verdict is not None
            else ("O(N) by nature (every node moves)" if event in PER_NODE else "")
        )
        print(f"writes per {event}: " + "; ".join(cells) + f"; {target}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, nargs="*", default=[128, 512, 1024, 4096])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainctl-writes-") as tmp:
        print_writes(run(args.nodes, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
