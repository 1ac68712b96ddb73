"""Worker functions for the memory tier's slot tests (imported by spawned ranks).

Two FSDP2 ranks (`dist_workers`' model and gloo file rendezvous) save every step into their
slots; then, as a restarted attempt would, each builds a fresh model and restores through
`restore_tiers` from the slots; rank 0 writes what the parent asserts on.
"""

from __future__ import annotations

import shutil
from typing import Any

import dist_workers as workers
import torch
import torch.distributed as dist

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import restore_tiers
from trainctl.runtime.checkpoint import ModelAndOptimizer, TrainerState
from trainctl.runtime.memory_tier import MemoryTier


def learning_rate(step: int) -> float:
    """A schedule, so the optimizer's non-tensor values change every step."""
    return 1e-2 / step


def print_of(model: Any, optimizer: Any, trainer: TrainerState) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer, the learning rate, the step and the RNG."""
    out = workers.fingerprint(model, optimizer)
    out["lr"] = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)
    out["trainer.step"] = torch.tensor(trainer.step)
    out["rng"] = torch.get_rng_state()
    return out


def save_then_restore(
    rank: int, node_root: str, snapshot_root: str, durable_root: str, out_file: str, steps: int
) -> None:
    """Attempt 0: train `steps` steps, each saved into the slots (durable: step 2 only); rank 0
    copies the node directory to `snapshot_root` for the single-process tests. Attempt 1 (same
    processes, fresh model): restore from the slots; save one more step."""
    events: list[tuple[str, dict[str, Any]]] = []

    def sink(name: str, fields: dict[str, Any]) -> None:
        events.append((name, fields))

    model = workers.shard(workers.build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate(1))
    trainer = TrainerState()
    state = {"app": ModelAndOptimizer(model, optimizer), "trainer": trainer}
    memory = MemoryTier.open(node_root, 1, on_event=sink, attempt=0)
    durable = Checkpointer(durable_root, interval_steps=2, on_event=sink)
    prints = {}
    torch.manual_seed(7)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        workers.train_step(model, optimizer, step)
        torch.rand(3)  # the RNG moves every step
        trainer.step = step
        memory.save(step, state)
        if step == 2:
            durable.save(step, state)
            durable.wait()
        prints[step] = print_of(model, optimizer, trainer)
    memory.close()
    dist.barrier()
    if rank == 0:
        shutil.copytree(node_root, snapshot_root)
    dist.barrier()

    fresh = workers.shard(workers.build_model())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    workers.train_step(fresh, fresh_optimizer, 0)  # optimizer state exists to load into
    fresh_trainer = TrainerState()
    restored_state = {"app": ModelAndOptimizer(fresh, fresh_optimizer), "trainer": fresh_trainer}
    torch.manual_seed(12345)
    again = MemoryTier.open(node_root, 1, on_event=sink, attempt=1)
    restored = restore_tiers(again.restorer, durable, restored_state, sink)
    got = print_of(fresh, fresh_optimizer, fresh_trainer)
    # The restarted attempt's first save goes to the slot not holding the restored step.
    again.save(steps + 1, restored_state)
    slot = again.writer.next_slot
    again.close()
    durable.close()
    if rank == 0:
        torch.save(
            {
                "prints": prints,
                "restored": restored,
                "got": got,
                "events": events,
                "next_slot": slot,
            },
            out_file,
        )
