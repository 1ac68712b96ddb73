"""The training loop both recipes share: FSDP2, deterministic data by step, trainctl.runtime.

Data for step s is a *global* batch drawn from a generator seeded by (seed, s); each rank takes
its slice. Gradients are averaged over ranks, so the same job on a different number of ranks
computes the same update (up to floating-point reduction order), and a resumed run sees
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import fully_shard

from trainctl import runtime
from trainctl.runtime.checkpoint import checkpointing
from trainctl.runtime.fingerprint import model_fingerprint

Batch = tuple[torch.Tensor, ...]
WARMUP_STEPS = 2


def spin_forever() -> None:
    """Tests: a rank stuck in a Python loop (a livelock, a bug): busy, never done."""
    count = 0
    while True:
        count += 1


def batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], distributed: bool) -> None:
    """FSDP2: shard each block, then the root. Without a process group, leave it plain."""
    if not distributed:
        return
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def rank_slice(global_batch: Batch, rank: int, world_size: int) -> Batch:
    size = global_batch[0].shape[0]
    if size % world_size:
        raise SystemExit(
            f"config.batch_size={size} is not divisible by the world size {world_size}: "
            "choose a batch size that every world size the job may run at divides"
        )
    per_rank = size // world_size
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in global_batch)


def train(
    name: str,
    build_model: Callable[[dict[str, Any]], tuple[torch.nn.Module, list[torch.nn.Module]]],
    make_batch: Callable[[dict[str, Any], torch.Generator], Batch],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    defaults: dict[str, Any],
) -> None:
    ctx = runtime.init()
    config = {**defaults, **ctx.config}
    if config.get("deterministic") and ctx.device.type == "cuda":
        # Bit-identical runs on GPUs (the fingerprint oracle): deterministic kernels, and
        # attention by the math kernel (the memory-efficient one accumulates its backward with
        # atomic adds). Needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the recipe's env.
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    max_steps = ctx.max_steps or int(config["steps"])
    torch.manual_seed(ctx.seed)  # identical initial weights on every rank and every run
    model, blocks = build_model(config)
    # Built on the CPU (the same weights on any device), then onto this rank's device:
    # cuda:LOCAL_RANK on a GPU node, the CPU otherwise (a no-op).
    model.to(ctx.device)
    shard_model(model, blocks, ctx.distributed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]), weight_decay=0.01)
    ckpt = checkpointing(ctx, model, optimizer)
    step = start_step = ckpt.restore() if ckpt else 0
    # Tests: fingerprint the weights at every save and after a restore (collectives), so a
    # resharded restore can be checked bit for bit against what was saved.
    check_fingerprints = bool(config.get("fingerprint_checkpoints", False))
    if step:
        ctx.log(f"resumed from the checkpoint of step {step}")
        if check_fingerprints:
            digest = model_fingerprint(model)
            if digest:
                ctx.event(
                    "restored_fingerprint", f"restored step {step}", step=step, fingerprint=digest
                )
    step_sleep_s = float(config.get("step_sleep_s", 0.0))  # tests: slow steps down
    fail_at_step = int(config.get("fail_at_step", 0))  # tests: a software error at that step
    fail_in = config.get("fail_in_attempts", [0])  # ... in these attempts ("all": every one)
    spin_at_step = int(config.get("spin_at_step", 0))  # tests: a rank loops in Python ...
    spin_node = config.get("spin_node")  # ... local rank 0 of this node, first attempt only
    if ctx.is_main:
        params = sum(p.numel() for p in model.parameters())  # DTensor numel is global
        ctx.log(
            f"{name}: ~{params / 1e6:.2f}M parameters, world size {ctx.world_size}, "
            f"steps {max_steps}, attempt {ctx.attempt}"
        )
    started = time.perf_counter()
    warm_step, warm_time = step, started
    while step < max_steps:
        with ctx.busy():  # local work, no collective: what straggler detection compares
            batch = ctx.to_device(
                rank_slice(
                    make_batch(config, batch_generator(ctx.seed, step)), ctx.rank, ctx.world_size
                )
            )
            if step_sleep_s:
                time.sleep(step_sleep_s)
        if step + 1 == fail_at_step and (fail_in == "all" or ctx.attempt in fail_in):
            raise RuntimeError(f"injected failure at step {step + 1}")
        on_node = os.environ.get("TRAINCTL_NODE") == spin_node and ctx.local_rank == 0
        if step + 1 == spin_at_step and on_node and ctx.attempt == 0:
            spin_forever()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        saved = bool(ckpt and ckpt.maybe_save(step))
        # A collective every rank enters only after its own save: once it returns, every rank's
        # copy of this step is in memory (its slot's record written).
        stop = ctx.should_stop()
        # Progress only then: a worker killed after step N was reported restores step N from
        # memory and replays nothing, whichever rank dies.
        ctx.progress(step)
        if saved and check_fingerprints:
            digest = model_fingerprint(model)
            if digest:
                ctx.event("saved_fingerprint", f"saved step {step}", step=step, fingerprint=digest)
        if ctx.is_main and (step % 10 == 0 or step == max_steps):
            ctx.log(f"step {step} loss {loss.item():.5f} ({time.perf_counter() - started:.1f}s)")
        if step == start_step + WARMUP_STEPS:
            warm_step, warm_time = step, time.perf_counter()
        if stop:
            ctx.log(f"stop requested at step {step}")
            if ckpt and not ckpt.checkpointer.should_save(step):
                ckpt.save(step)  # preempted: leave a checkpoint of exactly this step
            break
    if ctx.is_main and step > warm_step:
        elapsed = time.perf_counter() - warm_time
        ctx.log(
            f"throughput: {step - warm_step} steps in {elapsed:.3f}s "
            f"({(step - warm_step) / elapsed:.3f} steps/s after {WARMUP_STEPS} warm-up steps)"
        )
    if ckpt:
        ckpt.finish()
    if step > start_step:
        # The last step's loss over the whole global batch (each rank saw its slice), so runs
        # at different world sizes compare.
        final = loss.detach().clone()
        if ctx.distributed:
            import torch.distributed as dist

            dist.all_reduce(final, op=dist.ReduceOp.SUM)
            final /= ctx.world_size
        if ctx.is_main:
            value = float(final.item())
            ctx.event("train_finished", f"final loss {value:.6f}", step=step, loss=value)
    ctx.finish(model, step)
    ctx.exit(0)
