"""How many memory saves ``checkpoint.memory.slots: 1`` skips (issue 17's memory bound).

With one slot per copy and a replica, a worker rewrites its slot only once its holder has
replicated the step the slot holds; a save that comes sooner is skipped (one more step replayed
if a worker is killed before the next). This runs two simulated nodes on loopback in one process
(a real `Holder` each, at its default bandwidth and duty cycle, and one rank's `SlotWriter` each
with ``slots=1, replicas=1``), saves a flat state of SIZE MiB every STEP ms for STEPS steps, and
prints the median share of saves skipped over REPEATS runs. The holders share this process's GIL
with the writers, so the figures are indicative, not a training job's.

    python benchmarks/memory_skips.py [--step-ms 30 100 300] [--sizes-mb 2.7 20] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import uuid

import torch

from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.slots import SlotWriter

NODES = ("node-0", "node-1")


def skipped_share(step_s: float, steps: int, mib: float) -> float:
    base = f"/dev/shm/trainctl-bench-{uuid.uuid4().hex[:8]}"
    os.makedirs(base)
    holders = {n: Holder("bench", n, "bench-token", "127.0.0.1", base=base) for n in NODES}
    peers = PeerSet(0, {n: h.endpoint for n, h in holders.items()}, 1, slots=1)
    for holder in holders.values():
        holder.configure(peers)
    writers = [
        SlotWriter(node_memory_root("bench", n, base), i, 2, 0, slots=1, replicas=1)
        for i, n in enumerate(NODES)
    ]
    count = int(mib * 2**20 / 4) // 100
    flat = {f"w{i}": torch.randn(count) for i in range(100)}
    try:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            for writer in writers:
                writer.save(step, flat)
            time.sleep(max(0.0, step_s - (time.perf_counter() - started)))
        return sum(w.skipped for w in writers) / (len(writers) * steps)
    finally:
        for writer in writers:
            writer.close()
        for holder in holders.values():
            holder.close()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, nargs="+", default=[30, 100, 300])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[2.7, 20])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for step_ms in args.step_ms:
        for mib in args.sizes_mb:
            runs = [skipped_share(step_ms / 1e3, args.steps, mib) for _ in range(args.repeats)]
            print(
                json.dumps(
                    {
                        "step_ms": step_ms,
                        "mib_per_rank": mib,
                        "skipped_median": statistics.median(runs),
                        "runs": [round(r, 3) for r in runs],
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
