"""A torchrun on standby: torch already imported, waiting for its command line.

Importing torch costs a node agent about 1.2 s of CPU before torchrun can even join the
rendezvous — on the critical path of every relaunch. The agent keeps one of these ready: it
imports `torch.distributed.run` at once, then blocks on stdin for one JSON line
``{"argv": [...], "env": {...}}``, updates its environment (which the workers inherit) and runs
torchrun's own ``main`` (torchrun is called, never forked). Its exit status is torchrun's.

Run as ``python -m trainctl.launch.warmrun``; an empty stdin (the agent went away) exits 0.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import torch.distributed.run as torchrun  # the point: pay for this before it is needed

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
