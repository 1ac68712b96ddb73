"""Two gloo ranks through `trainctl.runtime`, for the collective-timeout and flight-recorder
tests. ``MODE`` (argv[1]):

- ``timeout``: 12 timed steps (each an all-reduce), then rank 1 sleeps far past the derived
  collective timeout while rank 0 enters one more all-reduce: rank 0 prints how it ended.
- ``spin``: 5 all-reduces, then rank 1 spins in Python holding the GIL while rank 0 waits in a
  sixth: the test reads both ranks' flight recorders from their debug servers meanwhile.

Each rank prints ``READY <rank>`` before the step the test watches.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from trainctl import runtime


def main() -> None:
    mode = sys.argv[1]
    ctx = runtime.init()
    tensor = torch.ones(8)
    steps = 12 if mode == "timeout" else 5
    for step in range(steps):
        dist.all_reduce(tensor)
        time.sleep(0.01)
        ctx.progress(step + 1)
    # one write: with PYTHONUNBUFFERED, print() writes the text and the newline separately,
    # and two ranks' lines interleave on the shared pipe
    sys.stdout.write(f"READY {ctx.rank}\n")
    sys.stdout.flush()
    if ctx.rank == 1:
        end = time.monotonic() + 120
        count = 0
        while time.monotonic() < end:  # sleeping (timeout) or spinning with the GIL (spin)
            if mode == "timeout":
                time.sleep(0.5)
            else:
                count += 1
        os._exit(0)
    started = time.monotonic()
    try:
        dist.all_reduce(tensor)
    except Exception as error:  # what the timeout raises
        print(f"COLLECTIVE FAILED after {time.monotonic() - started:.1f}s: {error}", flush=True)
        os._exit(3)
    print("COLLECTIVE COMPLETED", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
