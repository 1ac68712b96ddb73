"""A small synchronous training loop with a controlled pace, for health tests.

Each step: local work inside `ctx.busy()` (a tiny forward/backward plus `step_sleep_s`, and
`slow_extra_s` more on the nodes listed in `slow_nodes`, read from TRAINCTL_NODE), then a gloo
all-reduce of the gradients (every rank waits for the slowest), then `ctx.progress`.

Settings come from the recipe's `config:` (TRAINCTL_CONFIG): steps, step_sleep_s, slow_nodes,
slow_extra_s.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from trainctl import runtime


def main() -> None:
    ctx = runtime.init()
    config = ctx.config
    max_steps = ctx.max_steps or int(config.get("steps", 20))
    slow = ctx.node in config.get("slow_nodes", [])  # ctx.node is TRAINCTL_NODE
    pause_s = float(config.get("step_sleep_s", 0.05)) + (
        float(config.get("slow_extra_s", 0.0)) if slow else 0.0
    )
    torch.manual_seed(ctx.seed)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = 0
    while step < max_steps:
        with ctx.busy():
            generator = torch.Generator().manual_seed(ctx.seed * 1000 + step * 64 + ctx.rank)
            loss = model(torch.randn(4, 16, generator=generator)).pow(2).mean()
            loss.backward()
            time.sleep(pause_s)
        if ctx.distributed:
            for parameter in model.parameters():
                assert parameter.grad is not None
                dist.all_reduce(parameter.grad)
                parameter.grad /= ctx.world_size
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        ctx.progress(step)
        if ctx.should_stop():
            break
    ctx.finish(model, step)
    ctx.exit(0)  # no C++ teardown: it races with gloo's threads


if __name__ == "__main__":
    main()
