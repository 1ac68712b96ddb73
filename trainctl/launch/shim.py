"""torchrun's entry point for warm workers: hand this worker over to the node's zygote.

torchrun runs ``python -m trainctl.launch.shim SCRIPT ARGS...`` for each worker. The shim
imports nothing heavy: it sends its argv, environment, working directory and stdio to the
zygote (`trainctl.launch.zygote`), which forks the real worker with torch already imported.
The shim forwards SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP to the worker and exits with the
worker's status — dying of the same signal if the worker did — so torchrun sees the worker's
own exit. Without a reachable zygote it runs the script itself (``exec python SCRIPT``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

ZYGOTE_ENV = "TRAINCTL_ZYGOTE"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def _fallback(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-u", *argv])


def main(argv: list[str]) -> int:
    address = os.environ.get(ZYGOTE_ENV, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
    except OSError as error:
        print(f"trainctl shim: no zygote at {address!r} ({error}); starting cold", file=sys.stderr)
        _fallback(argv)
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
        died_of = os.WTERMSIG(status)
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
