"""An unmodified torchrun script: no trainctl imports, stock env:// process-group init."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = int(os.environ.get("PLAIN_STEPS", "5"))
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4 * world, 16, generator=gen)[rank * 4 : (rank + 1) * 4]
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"plain rank {rank}/{world} done after {steps} steps, args={sys.argv[1:]}", flush=True)
    dist.destroy_process_group()
    # torch 2.13 + gloo: about 1 exit in 12 aborts in C++ teardown ("terminate called without an
    # active exception") after the work is done; skip that teardown, as careful scripts do, so
    # this test is about trainctl, not about that race. The script still imports no trainctl.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
