"""Warm torchruns: a per-node process with torch imported that forks every attempt's torchrun.

Importing torch costs a node agent about 1.2 s of CPU before torchrun can even join the
rendezvous. The agent starts one of these when it starts and keeps it for the job
(`trainctl.launch.torchrun.TorchrunServer`): it imports `torch.distributed.run` once, says
``ready`` on its status pipe, then reads one JSON line per attempt on stdin,
``{"argv": [...], "env": {...}, "log": PATH}``, and forks a child that updates its environment
(which the workers inherit), points stdout and stderr at the node log, and runs torchrun's own
``main`` (its exit status is torchrun's). The server reports ``started PID`` and, when that
child ends, ``exited PID CODE`` (CODE as `subprocess.Popen.returncode` has it: -N for signal N).

Earlier a warm torchrun *became* the attempt's torchrun, so every relaunch started a fresh one
that imported torch again while the job was training: ~1.2 s of CPU per node per failure,
taken from the workers on a busy node. A fork costs milliseconds. Like the worker zygote
(`trainctl.launch.zygote`), the server starts no thread and initialises no device before it
forks.

The c10d rendezvous polls its store once a second while it waits for the other nodes, serves
its state from a 1 s cache in between, and sleeps up to 0.3 s more before a first round —
and every attempt's rendezvous is a first round: up to 1.3 s added to every relaunch. Here
both the poll delay and the cache are scaled to ``TRAINCTL_RDZV_POLL_S`` seconds (default
0.05: a few nodes polling a TCPStore that serves ~100k operations per second on this
project's machine; raise it for thousands of nodes).

Run as ``python -m trainctl.launch.warmrun STATUS_FD``; an empty stdin (the agent went away)
ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import traceback
from typing import Any

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


def run_torchrun(torchrun: Any, request: dict[str, Any]) -> int:
    """In a forked child: become the attempt's torchrun; returns its exit status."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = request.get("log")
    if log:
        out = os.open(str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    os.environ.update({str(k): str(v) for k, v in request.get("env", {}).items()})
    argv = [str(arg) for arg in request["argv"]]
    sys.argv = ["torchrun", *argv]
    try:
        torchrun.main(argv)
    except SystemExit as end:
        code = end.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # what an uncaught exception would do: the traceback, status 1
        traceback.print_exc()
        return 1
    return 0


def fork_torchrun(torchrun: Any, line: bytes, inherited: tuple[int, ...]) -> int:
    """Fork the child that runs `line`'s torchrun; returns its pid (in the server)."""
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:  # the server's pipes are not the attempt's
            os.close(fd)
        code = run_torchrun(torchrun, request)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def say(status_fd: int, line: str) -> None:
    os.write(status_fd, f"{line}\n".encode())


def serve(status_fd: int) -> int:
    import torch.distributed.run as torchrun  # the point: pay for this once per node

    tune_rendezvous_polling(float(os.environ.get(Env.RDZV_POLL_S, "0.05")))
    # A child's exit wakes the select below (no thread: the server forks).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stdin = sys.stdin.fileno()
    say(status_fd, "ready")
    children: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [], 1.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                say(status_fd, f"exited {pid} {os.waitstatus_to_exitcode(status)}")
        if stdin not in ready:
            continue
        chunk = os.read(stdin, 1 << 16)
        if not chunk:
            return 0  # the agent is gone; its teardown (or the node's) ends any child
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                pid = fork_torchrun(torchrun, line, (status_fd, wake_r, wake_w))
                children.add(pid)
                say(status_fd, f"started {pid}")


def main(argv: list[str]) -> int:
    return serve(int(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
