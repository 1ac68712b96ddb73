"""Worker functions for the multi-rank checkpoint tests (imported by spawned processes).

Each worker joins a gloo process group through a file rendezvous (no ports), builds a small
FSDP2 model on CPU, and saves or restores through the real `Checkpointer`. Rank 0 writes what
the parent asserts on (fingerprints, events) as a torch file next to the checkpoint.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.runtime.checkpoint import ModelAndOptimizer

WIDTH = 96  # uneven shards on 2 ranks are exercised by the 10-wide head


def build_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
    )


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    batch = torch.randn(8, WIDTH, generator=generator)
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The full (unsharded) model and optimizer state, on every rank, for exact comparison."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    full = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    for name, per_param in optim["state"].items():
        for key, value in per_param.items():
            full[f"optim.{name}.{key}"] = torch.as_tensor(value).clone()
    return {k: v.detach().clone() for k, v in full.items()}


def new_extra() -> dict[str, Any]:
    return {"step": 0, "rng": torch.zeros_like(torch.get_rng_state()), "data_position": [0, 0]}


def run(world_size: int, target: Callable[..., None], args: tuple[Any, ...], init_dir: str) -> None:
    """Run `target(rank, *args)` on `world_size` spawned ranks; raise if any rank failed."""
    mp.start_processes(
        _entry,
        args=(world_size, target, args, init_dir),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


def _entry(
    rank: int, world_size: int, target: Callable[..., None], args: tuple[Any, ...], init_dir: str
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_dir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        target(rank, *args)
    except BaseException:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    # Every rank gets here before any tears the group down, then the rank ends without C++
    # static destructors: that teardown races with gloo's threads and about 1 finished rank in
    # 12 aborted with "terminate called without an active exception" (see Runtime.exit).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _saving_every_step(root: str) -> tuple[Checkpointer, list[tuple[str, dict[str, Any]]]]:
    """A checkpointer that saves every step into `root`, and the events it reports (rank 0)."""
    events: list[tuple[str, dict[str, Any]]] = []
    checkpointer = Checkpointer(
        root,
        interval_steps=1,
        keep_last=5,
        part_size=5 << 20,
        on_event=lambda name, fields: events.append((name, fields)),
    )
    return checkpointer, events


# ----------------------------------------------------------------------------- scenarios


def save_while_training(
    rank: int, roots: list[tuple[str, dict[str, Any]]], out_file: str, steps: int
) -> None:
    """Train `steps` steps, saving every 2 to each root while training continues."""
    model = shard(build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    events: list[tuple[str, dict[str, Any]]] = []
    checkpointers = [
        Checkpointer(
            root,
            interval_steps=2,
            keep_last=5,
            storage_options=options,
            part_size=5 << 20,
            concurrency=2,
            on_event=lambda name, fields: events.append((name, fields)),
        )
        for root, options in roots
    ]
    prints: dict[int, dict[str, torch.Tensor]] = {}
    torch.manual_seed(99)  # the RNG state saved as an extra
    for step in range(1, steps + 1):
        train_step(model, optimizer, step)  # overlaps the previous save's upload
        extra = {"step": step, "rng": torch.get_rng_state(), "data_position": [step, 7 * step]}
        for checkpointer in checkpointers:
            checkpointer.maybe_save(
                step, {"app": ModelAndOptimizer(model, optimizer), "extra": extra}
            )
        if checkpointers[0].should_save(step):
            prints[step] = fingerprint(model, optimizer)
            prints[step]["extra.rng"] = extra["rng"].clone()
    outcomes = [checkpointer.wait() for checkpointer in checkpointers]
    for checkpointer in checkpointers:
        checkpointer.close()
    if rank == 0:
        torch.save({"prints": prints, "events": events, "outcomes": outcomes}, out_file)


def restore(rank: int, roots: list[tuple[str, dict[str, Any]]], out_file: str) -> None:
    """Restore each root into a fresh model; record the step, fingerprint, extras and events."""
    results = []
    for root, options in roots:
        model = shard(build_model())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train_step(model, optimizer, 0)  # optimizer state must exist to be loaded into
        events: list[tuple[str, dict[str, Any]]] = []
        checkpointer = Checkpointer(
            root,
            interval_steps=2,
            keep_last=5,
            storage_options=options,
            part_size=5 << 20,
            on_event=lambda name, fields, sink=events: sink.append((name, fields)),
        )
        extra = new_extra()
        step = checkpointer.restore_latest(
            {"app": ModelAndOptimizer(model, optimizer), "extra": extra}
        )
        checkpointer.close()
        results.append(
            {
                "step": step,
                "print": fingerprint(model, optimizer),
                "extra": extra,
                "events": events,
            }
        )
    if rank == 0:
        torch.save(results, out_file)


def stage_sharded_state(rank: int, out_file: str) -> None:
    """Stage an FSDP2 model/optimizer state (plus a 0-dim DTensor) twice, training between."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from trainctl.checkpoint.staging import Stager

    model = shard(build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer, 1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    scalar = distribute_tensor(torch.tensor(5.0), mesh, [Replicate()])

    def live() -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "scalar": scalar}

    def local(tree: Any) -> Any:
        if isinstance(tree, DTensor):
            return (
                "dtensor",
                tree.device_mesh,
                tree.placements,
                tuple(tree.shape),
                local(tree._local_tensor),
            )
        if isinstance(tree, torch.Tensor):
            return tree.detach().clone()
        if isinstance(tree, dict):
            return {key: local(value) for key, value in tree.items()}
        if isinstance(tree, list | tuple):
            return [local(value) for value in tree]
        return tree

    def pointers(tree: Any) -> set[int]:
        if isinstance(tree, DTensor):
            return {tree._local_tensor.data_ptr()} if tree._local_tensor.numel() else set()
        if isinstance(tree, torch.Tensor):
            return {tree.data_ptr()} if tree.numel() else set()
        if isinstance(tree, dict):
            return set().union(*(pointers(value) for value in tree.values()))
        if isinstance(tree, list | tuple):
            return set().union(*(pointers(value) for value in tree))
        return set()

    stager = Stager(pin_memory=False)
    staged = stager.stage(live())
    first = local(staged)
    expected_first = local(live())
    shared = pointers(staged) & pointers(live())
    train_step(model, optimizer, 2)  # the live state moves on; the staged copy must not
    scalar._local_tensor.add_(1.0)
    after_training = local(staged)
    again = local(stager.stage(live()))
    if rank == 0:
        torch.save(
            {
                "first": first,
                "expected_first": expected_first,
                "after_training": after_training,
                "again": again,
                "expected_again": local(live()),
                "shared_pointers": len(shared),
                "allocations": stager.num_allocations,
            },
            out_file,
        )


def save_with_a_failing_rank(rank: int, root: str, out_file: str) -> None:
    """Four saves; at the first, rank 1 alone holds a value that cannot be serialised; at the
    last, rank 1 alone holds a new value."""
    model = shard(build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer, 1)
    checkpointer, events = _saving_every_step(root)
    outcomes = []
    for step in (1, 2, 3, 4):
        extra = new_extra()
        extra["step"] = step
        state: dict[str, Any] = {"app": ModelAndOptimizer(model, optimizer), "extra": extra}
        if step == 1 and rank == 1:
            state["unpicklable"] = lambda: None  # fails in rank 1's write, after planning
        if step == 4 and rank == 1:
            # Rank 1's layout changes, rank 0's does not: rank 0 starts writing on its cached
            # plan, and must abandon that when the agreement says rank 1 plans anew.
            state["note"] = "only on rank 1"
        outcomes.append(checkpointer.save(step, state).result())
        last_print = fingerprint(model, optimizer)
        train_step(model, optimizer, step + 1)
    hits = checkpointer._early_metadata.hits
    checkpointer.close()
    torch.save(
        {"outcomes": outcomes, "events": events, "print": last_print, "early_hits": hits},
        f"{out_file}.{rank}",
    )


def gather_across_capacity(rank: int, out_file: str) -> None:
    """Three gathers through `Collectives.gather` with values below and above the slot size:
    rank 2's, then rank 1's overflow (the rest goes point to point), then none."""
    import pickle

    from trainctl.checkpoint.collectives import Collectives

    comm = Collectives(dist.group.WORLD)
    comm.gather_capacity = 64
    rounds = [
        ["zero", {"rank": 1}, b"2" * 1000],
        ["zero" * 100, list(range(2000)), {"small": 2}],
        [0, 1, 2],
    ]
    received, largest = [], []
    for values in rounds:
        received.append(comm.gather(values[rank]))
        largest.append(comm.largest_gathered)
        comm.gather_capacity = 2048  # as save_step does: the same on every rank
    if rank == 0:
        expected_largest = [max(len(pickle.dumps(v, protocol=5)) for v in r) for r in rounds]
        torch.save(
            {"received": received, "expected": rounds, "largest": largest},
            out_file,
        )
        assert largest == expected_largest, (largest, expected_largest)
    else:
        assert received == [[], [], []], received


def restore_through_a_head(rank: int, root: str, out_file: str) -> None:
    """Save a sharded 3 MB tensor plus small replicated items twice, then (rank 0 having
    corrupted `out_file`'s named byte, if any) restore into fresh state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def state(seed: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        big = torch.randn(2 * 393_216, generator=generator)  # 1.5 MiB per rank
        small = torch.arange(10) * seed  # replicated: saved once, in one rank's file
        return {"big": distribute_tensor(big, mesh, [Shard(0)]), "small": small}

    checkpointer, events = _saving_every_step(root)
    for step in (1, 2):
        assert checkpointer.save(step, state(step)).result().committed
    dist.barrier()
    if rank == 0 and os.path.exists(out_file + ".corrupt"):
        path, offset = torch.load(out_file + ".corrupt")
        with open(path, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    target = state(0)
    step = checkpointer.restore_latest(target)
    checkpointer.close()

    def _full(value: Any) -> Any:
        return value.full_tensor() if isinstance(value, DTensor) else value

    results = {
        "step": step,
        "big": target["big"].full_tensor(),
        "small": target["small"],
        "skipped": [fields["reason"] for name, fields in events if name == "restore_skipped"],
        "expected": {s: {k: _full(v) for k, v in state(s).items()} for s in (1, 2)},
    }
    torch.save(results, f"{out_file}.{rank}")
