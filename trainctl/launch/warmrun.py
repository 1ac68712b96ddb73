"""A torchrun on standby: torch already imported, waiting for its command line.

Importing torch costs a node agent about 1.2 s of CPU before torchrun can even join the
rendezvous — on the critical path of every relaunch. The agent keeps one of these ready: it
imports `torch.distributed.run` at once, then blocks on stdin for one JSON line
``{"argv": [...], "env": {...}}``, updates its environment (which the workers inherit) and runs
torchrun's own ``main`` (torchrun is called, never forked). Its exit status is torchrun's.

The c10d rendezvous polls its store once a second while it waits for the other nodes, serves
its state from a 1 s cache in between, and sleeps up to 0.3 s more before a first round —
and every attempt's rendezvous is a first round: up to 1.3 s added to every relaunch. Here
both the poll delay and the cache are scaled to ``TRAINCTL_RDZV_POLL_S`` seconds (default
0.05: a few nodes polling a TCPStore that serves ~100k operations per second on this
project's machine; raise it for thousands of nodes).

Run as ``python -m trainctl.launch.warmrun``; an empty stdin (the agent went away) exits 0.
"""

from __future__ import annotations

import json
import os
import sys

from trainctl.env import Env


def tune_rendezvous_polling(poll_s: float) -> None:
    """Make the c10d rendezvous wait `poll_s` between polls instead of 1 s (and its random
    first-round stagger at most `poll_s` instead of 0.3 s)."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous, utils

    original = utils._delay

    def delay(seconds: float | tuple[float, float]) -> None:
        if isinstance(seconds, tuple):
            original((0.0, min(seconds[1], poll_s)))
        else:
            original(min(seconds, poll_s))

    dynamic_rendezvous._delay = delay
    # The state is also served from a 1 s cache between polls: refresh it as often.
    holder = dynamic_rendezvous._BackendRendezvousStateHolder.__init__
    if holder.__defaults__ == (1,):
        holder.__defaults__ = (poll_s,)


def main() -> int:
    import torch.distributed.run as torchrun  # the point: pay for this before it is needed

    tune_rendezvous_polling(float(os.environ.get(Env.RDZV_POLL_S, "0.05")))

    line = sys.stdin.readline()
    if not line.strip():
        return 0
    request = json.loads(line)
    os.environ.update({str(k): str(v) for k, v in request.get("env", {}).items()})
    argv = [str(arg) for arg in request["argv"]]
    sys.argv = ["torchrun", *argv]
    torchrun.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
