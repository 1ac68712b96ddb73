"""torchrun's entry point for warm workers: hand this worker over to the node's zygote.

torchrun runs ``python -m trainctl.launch.shim SCRIPT ARGS...`` for each worker. The shim
imports nothing heavy: it sends its argv, environment, working directory and stdio to the
zygote (`trainctl.launch.zygote`), which forks the real worker with torch already imported.
The shim forwards SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP to the worker and exits with the
worker's status — dying of the same signal if the worker did — so torchrun sees the worker's
own exit. Without a zygote (none configured, or unreachable) it becomes the worker itself
(`become_worker`: the script runs in this process). Either way the worker, and only the
worker, gets the job's secret variables (`trainctl.secrets.apply_worker_secrets`), in its own
memory: torchrun never holds them and no process's initial environment shows them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

from trainctl.env import Env, unix_address
from trainctl.secrets import apply_worker_secrets

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def become_worker(argv: list[str]) -> int:
    """Run the script `argv` in this process as the worker; returns its exit code.

    The job's secret variables go into this process's environment only (never an exec's, so
    no /proc/<pid>/environ shows them), and the process is named ``tcw<rank>.<local rank>``,
    how tools tell a worker from the processes around it (`zygote.worker_identity`).
    """
    apply_worker_secrets(os.environ)
    rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(f"tcw{rank}.{local_rank}")
    except OSError:
        pass
    return run_script(argv)


def run_script(argv: list[str]) -> int:
    """Run ``argv[0]`` as ``__main__`` with `argv` as sys.argv and its directory first on the
    path, as ``python SCRIPT`` would; returns the exit code (an uncaught exception goes to
    sys.excepthook — trainctl.runtime's writes torchrun's error file — and is 1)."""
    import runpy

    script = argv[0]
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        kind, value, tb = sys.exc_info()
        assert kind is not None and value is not None
        sys.excepthook(kind, value, tb)
        return 1
    return 0


def _cold(argv: list[str]) -> int:
    code = become_worker(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(argv: list[str]) -> int:
    address = os.environ.get(Env.ZYGOTE, "")
    if not address:
        return _cold(argv)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(unix_address(address))
    except OSError as error:
        print(f"trainctl shim: no zygote at {address!r} ({error}); starting cold", file=sys.stderr)
        return _cold(argv)
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
    socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    reader = sock.makefile("rb")
    first = reader.readline()
    if not first:
        print("trainctl shim: the zygote closed the connection", file=sys.stderr)
        return 1
    pid = int(json.loads(first)["pid"])

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    line = reader.readline()
    if not line:
        return 1  # the zygote died; its worker with it (same session of the zygote's child)
    status = int(json.loads(line)["status"])
    if os.WIFSIGNALED(status):
        # Die of the worker's signal, so torchrun (and trainctl's blame) sees how it died.
        # SIGKILL's disposition cannot be changed (nor needs to be).
        died_of = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
