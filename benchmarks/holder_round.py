"""CPU per step of the memory tier's replication, part by part (issue 17's per-step cost).

Two real holders on loopback in this process (their server threads receive; no tick or
replication thread: this script drives the rounds), one `SlotWriter` writing a state of
`--mb` MiB in `--tensors` tensors (tiny-gpt small's rank holds ~6 MiB in ~120), and per step:
the worker's save (copy into the slot + record), the sending holder's round (sum the slot,
send it) and everything else the process spent (the receiving server: bytes in, CRC check,
record). CPU time, not wall: on a host whose cores the training fills, every CPU millisecond
here is taken from it.

Beside them, measured in the same run, the physical floor of one replicated step: a memcpy of
the state (the save, and each of the socket's copies out and in) and a checksum of it with the
slots' algorithm, CRC-32C (the sender's sum and the receiver's check); zlib's CRC-32, which
the slots used before, is printed beside it.

    python benchmarks/holder_round.py [--mb 6] [--tensors 120] [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import crc32c
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.slots import SlotWriter

TOKEN = "bench"


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def one_run(base: str, mb: float, tensors: int, steps: int) -> dict[str, float]:
    """Per-step CPU (seconds) of the save, the sender's round and the rest (the receiver)."""
    holders = {n: Holder("bench", n, TOKEN, "127.0.0.1", base=base) for n in ("node-0", "node-1")}
    peers = PeerSet(0, {n: h.endpoint for n, h in holders.items()}, 1)
    for holder in holders.values():
        holder.peers = peers  # not `configure`: no background threads, the rounds run here
    numel = max(1, int(mb * 2**20 / 4 / tensors))
    state: dict[str, Any] = {f"t{i}": torch.randn(numel) for i in range(tensors)}
    state["step"] = 0
    writer = SlotWriter(node_memory_root("bench", "node-0", base), 0, 1, 0)
    sender = holders["node-0"]
    try:
        for step in range(1, 4):  # warm: layout, slot files, held files, peer catalog
            writer.save(step, state)
            assert sender.replicate((0, step))
        save = send = 0.0
        total = _cpu()
        for step in range(4, 4 + steps):
            started = time.thread_time()
            writer.save(step, state)
            middle = time.thread_time()
            if not sender.replicate((0, step)):
                raise SystemExit(f"step {step} was not replicated")
            save += middle - started
            send += time.thread_time() - middle
        total = _cpu() - total
    finally:
        writer.close()
        for holder in holders.values():
            holder.close()
    return {
        "save_s": save / steps,
        "sender_s": send / steps,
        "receiver_and_rest_s": (total - save - send) / steps,
        "total_s": total / steps,
    }


def floor(mb: float, repeats: int = 20) -> dict[str, float]:
    """A memcpy, a CRC-32C and a zlib CRC-32 of `mb` MiB here (medians of `repeats`, CPU s)."""
    source = torch.randint(0, 255, (int(mb * 2**20),), dtype=torch.uint8)
    target = torch.empty_like(source)
    view = memoryview(source.numpy())
    copies, crcs, zlibs = [], [], []
    for _ in range(repeats):
        started = time.thread_time()
        target.copy_(source)
        copies.append(time.thread_time() - started)
        started = time.thread_time()
        crc32c.crc32c(view)
        crcs.append(time.thread_time() - started)
        started = time.thread_time()
        zlib.crc32(view)
        zlibs.append(time.thread_time() - started)
    return {
        "memcpy_s": statistics.median(copies),
        "crc32c_s": statistics.median(crcs),
        "zlib_crc32_s": statistics.median(zlibs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=6.0, help="state per rank, MiB")
    parser.add_argument("--tensors", type=int, default=120)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not os.path.isdir("/dev/shm"):
        raise SystemExit("no /dev/shm on this host")
    runs = []
    for _ in range(args.repeats):
        base = tempfile.mkdtemp(prefix="trainctl-bench-", dir="/dev/shm")
        try:
            runs.append(one_run(base, args.mb, args.tensors, args.steps))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    parts = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    limit = floor(args.mb)
    # One replicated step at least: the save's copy, the socket's copy out and in, two sums.
    physical = 3 * limit["memcpy_s"] + 2 * limit["crc32c_s"]
    results = {"settings": vars(args), "per_step": parts, "floor": limit, "physical_s": physical}
    ms = 1e3
    print(
        f"{args.mb:g} MiB in {args.tensors} tensors, {args.steps} steps, median of "
        f"{args.repeats}: CPU per step",
        file=sys.stderr,
    )
    for key, value in parts.items():
        print(f"  {key:20} {value * ms:6.2f} ms", file=sys.stderr)
    print(
        f"  physical floor       {physical * ms:6.2f} ms (3 x memcpy {limit['memcpy_s'] * ms:.2f} "
        f"+ 2 x crc32c {limit['crc32c_s'] * ms:.2f}; zlib crc32 {limit['zlib_crc32_s'] * ms:.2f}); "
        f"total / floor {parts['total_s'] / physical:.2f}x",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
