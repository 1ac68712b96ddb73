"""The memory checkpoint tier: stall per memory save, restore from memory vs durable storage,
and replayed steps after a worker kill with the tier on and off.

1. **Stall** (one process, one rank's state of SIZE MB): the median time `MemoryTier.save`
   blocks the training loop (the staging copy; the write into tmpfs runs in the background),
   beside the physical limit measured in the same run: a `copy_` of the same bytes into a
   preallocated buffer (memcpy). Target (issue 17): stall <= 1.5 x memcpy + 5 ms.
2. **Restore**: the median time `Checkpointer.restore_latest` takes to load the newest step
   (every block verified) from the memory tier (tmpfs), from durable file storage (a temp
   dir on disk: the page cache may hold it, so this is file's best case) and from S3 (a moto
   server on loopback, port 0); the peer: plain `dcp.load` (no verification) from tmpfs.
   **From a peer's replica**: node-0's rank writes its slot files (as the worker does),
   node-0's holder checksums and replicates them to node-1's over TCP (loopback), node-0's RAM
   is dropped (its host died), and a fresh spare node-2's holder assembles the restore index
   (every copy's CRC summed at node-1) and every entry is read from node-1 by a ranged get
   straight into the tensor and CRC-checked, what the worker's reader does (without DCP's
   planning, which is the worker side's): what a relaunch onto a spare waits for.
   Target: restore from peer memory >= 5x faster than from S3.
3. **Replayed steps** (``--e2e``): real 2-node `trainctl launch` jobs of tiny-gpt (80 steps of
   compute, no sleep) with a worker SIGKILLed at step 15 (durable checkpoints every 10 steps),
   memory tier on and off: steps replayed = kill step - restored step, the median step time
   (the tier's per-step cost: its save every step) and the job's wall time.

    python benchmarks/memory_tier.py [--sizes-mb 100 1000] [--repeats 5] [--e2e] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.holder import Holder, PeerSet
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.memory import (
    MEMORY_BASE,
    PEER_TIER,
    release_memory,
    release_node_memory,
)
from trainctl.checkpoint.peer_wire import read_token
from trainctl.checkpoint.slot_layout import INDEX_NAME, RESTORE_DIR, RestoreIndex, read_json
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slot_reader import SlotReader
from trainctl.checkpoint.slots import SlotWriter, flatten
from trainctl.runtime.memory_tier import MemoryTier
from trainctl.store import JobStore

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
TARGET_STALL_RATIO = 1.5
TARGET_STALL_SLACK_S = 0.005
TARGET_RESTORE_SPEEDUP = 5.0
E2E_STEPS = 80
"""Long enough for a step-time median on either side of the kill (at step 15)."""


def _state(size_mb: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    numel = size_mb * MIB // 4
    return {"w": torch.rand(numel, generator=generator), "extra": {"step": seed}}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_stall(size_mb: int, repeats: int, job: str) -> dict[str, Any]:
    state = _state(size_mb, 1)
    target = torch.empty_like(state["w"])
    memcpy = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(state["w"])
        memcpy.append(time.perf_counter() - started)
    root = node_memory_root(job, "node-0")
    tier = MemoryTier.open(root, 1, on_event=lambda *_: None, pin_memory=False)
    stalls = []
    try:
        for step in range(1, repeats + 2):
            started = time.perf_counter()
            tier.save(step, state)  # synchronous: the copy into the slot and its record
            if step > 1:  # the first save lays the slots out and allocates them once
                stalls.append(time.perf_counter() - started)
    finally:
        tier.close()
        release_memory(job)
    stall, copy = _median(stalls), _median(memcpy)
    limit = TARGET_STALL_RATIO * copy + TARGET_STALL_SLACK_S
    return {
        "size_mb": size_mb,
        "stall_s": stall,
        "memcpy_s": copy,
        "ratio": stall / copy,
        "target_s": limit,
        "met": stall <= limit,
    }


def _time_restore(checkpointer: Checkpointer, size_mb: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        blank = _state(size_mb, 0)
        started = time.perf_counter()
        step = checkpointer.restore_latest(blank)
        times.append(time.perf_counter() - started)
        assert step == 1, f"restored {step}"
    return _median(times)


def measure_restore(
    size_mb: int, repeats: int, job: str, s3_url: str | None, work: Path
) -> dict[str, Any]:
    state = _state(size_mb, 1)
    out: dict[str, Any] = {"size_mb": size_mb}
    out["memory_s"] = measure_local_restore(state, size_mb, repeats, job)
    release_memory(job)
    roots: dict[str, tuple[str, dict[str, Any]]] = {
        "file": (f"file://{work}/durable-{size_mb}", {}),
    }
    if s3_url is not None:
        options = {"endpoint_url": s3_url, "key": "testing", "secret": "testing"}
        roots["s3"] = (f"s3://bench/{job}-{size_mb}", options)
    for tier, (root, options) in roots.items():
        checkpointer = Checkpointer(
            root,
            interval_steps=1,
            storage_options=options or None,
            direct_io=True,
            pin_memory=False,
            tier="durable",
        )
        try:
            checkpointer.save(1, state)
            checkpointer.wait()
            out[f"{tier}_s"] = _time_restore(checkpointer, size_mb, repeats)
        finally:
            checkpointer.close()
    # The peer: plain DCP from tmpfs, nothing verified.
    plain = os.path.join(MEMORY_BASE, f"trainctl-bench-plain-{os.getpid()}")
    try:
        dcp.save(state, checkpoint_id=plain)
        times = []
        for _ in range(repeats):
            blank = _state(size_mb, 0)
            started = time.perf_counter()
            dcp.load(blank, checkpoint_id=plain)
            times.append(time.perf_counter() - started)
        out["plain_dcp_tmpfs_s"] = _median(times)
    finally:
        shutil.rmtree(plain, ignore_errors=True)
    release_memory(job)
    out.update(measure_peer_restore(state, size_mb, repeats, f"{job}-peer", work))
    release_memory(f"{job}-peer")
    out["memcpy_s"] = measure_memcpy(state)
    if "s3_s" in out:
        out["speedup_vs_s3"] = out["s3_s"] / out["memory_s"]
        out["peer_speedup_vs_s3"] = out["s3_s"] / out["peer_s"]
        out["met"] = out["peer_speedup_vs_s3"] >= TARGET_RESTORE_SPEEDUP
    out["speedup_vs_file"] = out["file_s"] / out["memory_s"]
    return out


def measure_local_restore(state: dict[str, Any], size_mb: int, repeats: int, job: str) -> float:
    """Median restore from the node's own slots (a worker died, the node survived): the index
    of the newest complete step with every entry summed (as the holder's assemble sums a copy
    it has not summed), then DCP's load through the `SlotReader` (the slot mmap'd in place,
    every entry CRC-checked again, copied into the state)."""
    root = node_memory_root(job, "node-0")
    _write_slot(root, state["w"], 1)
    times = []
    for _ in range(repeats):
        blank = _state(size_mb, 0)
        started = time.perf_counter()
        index = local_restore_index(root)
        assert isinstance(index, RestoreIndex), index
        dcp.load(_pieces(blank["w"]), storage_reader=SlotReader(index), no_dist=True)
        times.append(time.perf_counter() - started)
        assert index.step == 1 and torch.equal(blank["w"], state["w"]), "the restore differs"
    return _median(times)


def _wait_for(predicate: Any, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


ENTRY_BYTES = 16 * MIB
"""The simulated rank's state is cut into entries of this size (a model's tensors: the DCP
benchmark's 1 GB is 60 tensors of ~16 MiB)."""


def _pieces(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`tensor` as a model's tensors of `ENTRY_BYTES` each (views: loading into them fills it)."""
    flat = tensor.view(-1)
    per = ENTRY_BYTES // flat.element_size()
    return {f"w.{i}": flat[at : at + per] for i, at in enumerate(range(0, flat.numel(), per))}


def _write_slot(root: str, tensor: torch.Tensor, step: int) -> None:
    """Save `tensor` as rank 0's (world size 1) slot with the worker's own `SlotWriter`: the
    layout once (DCP's planner), a preallocated slot, the copy, then the record."""
    writer = SlotWriter(root, rank=0, world_size=1, attempt=0)
    try:
        writer.save(step, flatten(_pieces(tensor)))
    finally:
        writer.close()


def _read_index(root: str, into: torch.Tensor, token: str = "") -> int:
    """Restore `into` as the worker does: DCP's load through the `SlotReader` over the holder's
    ``restore/index.json`` (a local slot in place, a remote one by ranged gets, every entry
    CRC-checked, then copied into the state); returns the step."""
    index = RestoreIndex.from_json(read_json(os.path.join(root, RESTORE_DIR, INDEX_NAME)))
    dcp.load(_pieces(into), storage_reader=SlotReader(index, token), no_dist=True)
    return index.step


def measure_peer_restore(
    state: dict[str, Any], size_mb: int, repeats: int, job: str, work: Path
) -> dict[str, Any]:
    """Median restore onto a fresh spare from a peer's memory: the holder's assemble (which
    step, where each copy is, every copy's CRC summed at the peer that holds it) plus the
    worker's DCP load through its `SlotReader` (every entry by a ranged get from the peer,
    CRC-checked, copied into the state); the assemble part alone."""
    token = "bench-token"
    holders = {n: Holder(job, n, token, "127.0.0.1") for n in ("node-0", "node-1")}
    try:
        everyone = PeerSet(0, {n: h.endpoint for n, h in holders.items()}, 1)
        for holder in holders.values():
            holder.configure(everyone)
        _write_slot(node_memory_root(job, "node-0"), state["w"], 1)
        written = time.perf_counter()
        survivor = holders["node-1"]
        _wait_for(lambda: holders["node-0"].replicated == (0, 1), "step 1 replicated")
        replicate_s = time.perf_counter() - written  # record -> summed, sent, verified, held
        holders.pop("node-0").close()
        release_node_memory(job, "node-0")  # node-0's host died: its RAM with it
        totals, assembles = [], []
        for repeat in range(repeats):
            name = f"spare-{repeat}"
            spare = Holder(job, name, token, "127.0.0.1")
            try:
                spare.configure(PeerSet(1, {"node-1": survivor.endpoint, name: spare.endpoint}, 1))
                blank = _state(size_mb, 0)
                started = time.perf_counter()
                assembly = spare.assemble()
                assembled = time.perf_counter()
                step = _read_index(spare.root, blank["w"], read_token(token))
                totals.append(time.perf_counter() - started)
                assembles.append(assembled - started)
                assert (step, assembly.tier) == (1, PEER_TIER), (step, assembly)
                assert torch.equal(blank["w"], state["w"]), "the peer restore differs"
            finally:
                spare.close()
                release_node_memory(job, name)
        return {
            "peer_s": _median(totals),
            "peer_assemble_s": _median(assembles),
            "replicate_s": replicate_s,
        }
    finally:
        for holder in holders.values():
            holder.close()


def measure_memcpy(state: dict[str, Any]) -> float:
    target = torch.empty_like(state["w"])
    times = []
    for _ in range(3):
        started = time.perf_counter()
        target.copy_(state["w"])
        times.append(time.perf_counter() - started)
    return _median(times)


def median_step(log: Path) -> float | None:
    """The median interval between consecutive steps of one process in a step log (rank 0
    appends "time pid step world_size" per step)."""
    rows = (
        sorted(
            (float(parts[0]), int(parts[1]), int(parts[2]))
            for parts in (line.split() for line in log.read_text().splitlines())
            if len(parts) >= 3
        )
        if log.exists()
        else []
    )
    deltas = [
        later[0] - earlier[0]
        for earlier, later in itertools.pairwise(rows)
        if later[1] == earlier[1] and later[2] == earlier[2] + 1
    ]
    return statistics.median(deltas) if deltas else None


def e2e_run(work: Path, memory: bool, run: int) -> dict[str, Any]:
    """One 2-node tiny-gpt job, a worker SIGKILLed at step 15; what it replayed."""
    job = f"mem-{'on' if memory else 'off'}-{run}"
    checkpoint: dict[str, Any] = {"interval_steps": 10, "keep_last": 2}
    if memory:
        checkpoint["memory"] = {"enabled": True}
    recipe = {
        "name": job,
        "script": str(REPO / "recipes" / "tiny_gpt.py"),
        "nodes": 2,
        "seed": 0,
        "max_steps": E2E_STEPS,
        "config": {
            "vocab": 256,
            "dim": 128,
            "layers": 2,
            "heads": 4,
            "seq_len": 32,
            "batch_size": 8,
            "lr": 0.003,
            "steps": E2E_STEPS,
        },
        "checkpoint": checkpoint,
        "env": {"TRAINCTL_STEP_LOG": str(work / f"{job}.steps")},
    }
    path = work / f"{job}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    storage = work / "store"
    started = time.perf_counter()
    command = [
        "timeout", "-s", "KILL", "300", sys.executable, "-m", "trainctl.cli.main", "launch",
        str(path), "--job-id", job, "--json", "--fault", "kill-worker:node-1@step=15",
        "--storage", str(storage),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    state = JobStore(str(storage)).read_state(job).to_json()
    restored = [a.get("restored_step") for a in state["attempts"][1:]]
    step = restored[0] if restored and restored[0] is not None else 0
    return {
        "memory": memory,
        "median_step_s": median_step(work / f"{job}.steps"),
        "exit": done.returncode,
        "restored_step": step,
        "replayed_steps": 15 - step,
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also run the kill-a-worker jobs")
    parser.add_argument("--e2e-runs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = f"bench-{os.getpid()}"
    server, s3_url = None, None
    if not args.no_s3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        s3_url = f"http://{host}:{port}"
        boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
    results: dict[str, Any] = {"stall": [], "restore": [], "e2e": []}
    try:
        with tempfile.TemporaryDirectory() as directory:
            work = Path(directory)
            for size in args.sizes_mb:
                print(f"stall, {size} MB ...", file=sys.stderr, flush=True)
                results["stall"].append(measure_stall(size, args.repeats, job))
                release_memory(job)
                print(f"restore, {size} MB ...", file=sys.stderr, flush=True)
                results["restore"].append(measure_restore(size, 3, job, s3_url, work))
            if args.e2e:
                for run in range(args.e2e_runs):
                    for memory in (True, False):
                        print(f"e2e memory={memory} run {run} ...", file=sys.stderr, flush=True)
                        results["e2e"].append(e2e_run(work, memory, run))
    finally:
        release_memory(job)
        if server is not None:
            server.stop()
    _print(results)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def _print(results: dict[str, Any]) -> None:
    err = sys.stderr
    print("\nstall per memory save (median) vs memcpy of the same bytes", file=err)
    for row in results["stall"]:
        print(
            f"  {row['size_mb']:>5} MB  stall {row['stall_s'] * 1e3:8.1f} ms  memcpy "
            f"{row['memcpy_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.2f}  target "
            f"<= {row['target_s'] * 1e3:.1f} ms  met={row['met']}",
            file=err,
        )
    print("\nrestore (median, every block verified) vs plain DCP from tmpfs", file=err)
    for row in results["restore"]:
        s3 = f"s3 {row['s3_s']:.3f} s  x{row['speedup_vs_s3']:.1f}  " if "s3_s" in row else ""
        peer_vs_s3 = (
            f" (S3/peer x{row['peer_speedup_vs_s3']:.1f}, target >= {TARGET_RESTORE_SPEEDUP:.0f}"
            f", met={row['met']})"
            if "s3_s" in row
            else ""
        )
        print(
            f"  {row['size_mb']:>5} MB  memory {row['memory_s']:.3f} s  file {row['file_s']:.3f} s"
            f"  {s3}plain-dcp-tmpfs {row['plain_dcp_tmpfs_s']:.3f} s  memcpy "
            f"{row['memcpy_s']:.3f} s",
            file=err,
        )
        print(
            f"  {'':>5}     from a peer's replica {row['peer_s']:.3f} s (assemble, CRCs at peer "
            f"{row['peer_assemble_s']:.3f} s){peer_vs_s3}",
            file=err,
        )
        print(
            f"  {'':>5}     replication lag (record -> held at the peer, verified) "
            f"{row['replicate_s']:.3f} s: a node loss restores from the replica only when "
            "this is under about one memory interval",
            file=err,
        )
    if results["e2e"]:
        print("\nworker SIGKILL at step 15, durable every 10 steps", file=err)
        for row in results["e2e"]:
            print(
                f"  memory={row['memory']!s:5}  exit {row['exit']}  restored {row['restored_step']}"
                f"  replayed {row['replayed_steps']}  median step "
                f"{(row['median_step_s'] or float('nan')) * 1e3:.1f} ms  "
                f"wall {row['wall_s']:.1f} s",
                file=err,
            )


if __name__ == "__main__":
    sys.exit(main())
