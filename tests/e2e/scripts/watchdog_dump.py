"""A rank that dies the way NCCL's watchdog ends one: it writes its flight recorder where
``TORCH_FR_DUMP_TEMP_FILE`` points (torch's pickle format) and aborts, as
``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` tears a process down after a collective timed out.
The other ranks train on (then lose their peer). For the test that trainctl collects such
dumps into the job store, which no CPU run of NCCL can produce."""

from __future__ import annotations

import os
import pickle
import time

import torch
import torch.distributed as dist

from trainctl import runtime


def main() -> None:
    ctx = runtime.init()
    tensor = torch.ones(4)
    for step in range(1, 4):
        dist.all_reduce(tensor)
        ctx.progress(step)
    if ctx.rank == 0:
        entries = [
            {
                "collective_seq_id": seq,
                "process_group": ("0", "default_pg"),
                "profiling_name": "nccl:all_reduce",
                "state": "completed" if seq < 7 else "started",
                "retired": seq < 7,
                "is_p2p": False,
            }
            for seq in range(1, 8)
        ]
        with open(os.environ["TORCH_FR_DUMP_TEMP_FILE"] + str(ctx.rank), "wb") as dump:
            pickle.dump({"version": "2.10", "pg_config": {}, "entries": entries}, dump)
        os.abort()
    time.sleep(60)


if __name__ == "__main__":
    main()
