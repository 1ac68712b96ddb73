"""Warm workers: a per-node process with torch already imported that forks training workers.

A fresh worker spends about 1.7 s of CPU importing torch, torch.distributed, FSDP, DCP and
trainctl.runtime before it can join the process group — the largest part of a relaunch on
this project's machine. The node agent keeps one zygote running for the whole job. torchrun
still starts every worker (it is called, never forked): its entry point is the tiny
`trainctl.launch.shim`, which hands its argv, environment, working directory and stdio to the
zygote over a Unix socket; the zygote forks a child that becomes the worker (`run_worker`), and
relays the child's exit status back to the shim, which exits with it. A shim killed by torchrun
takes its worker with it (the zygote SIGKILLs a child whose shim connection closed); a signal
sent to the shim (SIGTERM, SIGUSR1, SIGUSR2) is forwarded to the worker.

The zygote never initialises CUDA or starts threads before forking (a fork after either is
unsafe). A forked worker names itself ``tcw<rank>.<local rank>`` (/proc/<pid>/comm): its initial
environment is the zygote's, so tools find it by that name (`worker_identity`).

Run as ``python -m trainctl.launch.zygote ADDRESS`` (an abstract Unix socket name, ``@...``).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import select
import signal
import socket
import sys
import traceback
from typing import Any

from trainctl.launch import proctree
from trainctl.launch.shim import become_worker
from trainctl.protocol import unix_address

PREIMPORTS = (
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    # fully_shard imports torch._dynamo on first use: 0.4 s of a relaunch otherwise.
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.elastic.multiprocessing.errors",
    "trainctl.runtime",
    "trainctl.runtime.checkpoint",
)
WORKER_NAME = re.compile(r"tcw(\d+)\.(\d+)")
MAX_REQUEST = 1 << 20


def worker_identity(pid: int) -> tuple[int, int] | None:
    """(rank, local rank) of a training worker process, None if `pid` is not one.

    A worker started the stock way carries RANK/LOCAL_RANK in its environment; a warm worker
    carries them in its name. The shim (RANK in its environment, but not the worker) is
    skipped.
    """
    try:
        with open(f"/proc/{pid}/comm") as handle:
            comm = handle.read().strip()
    except OSError:
        return None
    named = WORKER_NAME.fullmatch(comm)
    if named:
        return int(named[1]), int(named[2])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return None
    if b"trainctl.launch.shim" in cmdline or b"torch.distributed.run" in cmdline:
        return None
    env = proctree.environ(pid)
    if "RANK" not in env or "LOCAL_RANK" not in env:
        return None
    return int(env["RANK"]), int(env["LOCAL_RANK"])


def torch_threads(env: dict[str, str]) -> int:
    """The intra-op thread count a worker started the stock way would get.

    OMP_NUM_THREADS when the environment sets it (torchrun does when a node runs more than one
    worker), otherwise one per CPU the process may run on, as torch's OpenMP default is.
    """
    threads = env.get("OMP_NUM_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max(1, len(os.sched_getaffinity(0)))


def _set_torch_threads(env: dict[str, str]) -> None:
    # The zygote imported torch with one thread (no pool may exist before a fork): give the
    # worker what it would have had, or it silently computes on one core.
    import torch

    wanted = torch_threads(env)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def run_worker(request: dict[str, Any]) -> int:
    """In the forked child: become the worker the shim described, run it, return its code."""
    env = {str(k): str(v) for k, v in request["env"].items()}
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(OSError):
        os.chdir(str(request.get("cwd") or "/"))
    import random

    random.seed()  # every child would otherwise share the zygote's Python RNG state
    _set_torch_threads(env)
    return become_worker([str(arg) for arg in request["argv"]])


def _fork_worker(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            conn.close()
            os.setsid()
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = run_worker(request)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One request: a JSON line with up to 3 file descriptors (stdin, stdout, stderr)."""
    fds_buffer = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(
        MAX_REQUEST, socket.CMSG_SPACE(3 * fds_buffer.itemsize)
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_buffer.frombytes(payload[: len(payload) - (len(payload) % fds_buffer.itemsize)])
            fds = list(fds_buffer)
    while data and not data.endswith(b"\n"):
        more = conn.recv(MAX_REQUEST)
        if not more:
            break
        data += more
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), fds


def serve(address: str) -> None:
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(unix_address(address))
    listener.listen(64)
    children: dict[int, socket.socket] = {}  # worker pid -> its shim's connection
    by_conn: dict[socket.socket, int] = {}
    print(f"zygote ready on {address}", file=sys.stderr, flush=True)
    while True:
        readable, _, _ = select.select([listener, *by_conn], [], [], 0.05)
        for sock in readable:
            if sock is listener:
                conn, _ = listener.accept()
                received = _receive(conn)
                if received is None:
                    conn.close()
                    continue
                request, fds = received
                pid = _fork_worker(conn, request, fds)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[pid] = conn
                by_conn[conn] = pid
            else:
                # the shim went away (killed): its worker goes too
                pid = by_conn.pop(sock)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                sock.close()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            done = children.pop(pid, None)
            if done is None:
                continue
            conn = done
            by_conn.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            conn.close()
        if os.getppid() != parent:
            return  # the agent is gone


def main(argv: list[str]) -> int:
    (address,) = argv
    import importlib

    # Thread pools must not exist before a fork: import with one OpenMP thread (each worker
    # sets its own count from its environment, `run_worker`).
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in PREIMPORTS:
        importlib.import_module(name)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork would copy locks held by threads that do not exist in the child
        print(f"zygote: {threads} threads after imports; not safe to fork", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(address)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
