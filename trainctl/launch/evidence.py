"""What a node agent can tell about how its workers died, beyond torchrun's exit code.

- **Tracebacks.** A script that uses ``@record`` or `trainctl.runtime` leaves torchrun an
  ``error.json``; a plain torchrun script leaves nothing but its stderr. torchrun runs with
  ``--tee=2`` and ``--log-dir`` (`trainctl.launch.plan`), so each local rank's stderr is also in
  ``<log-dir>/<run>/attempt_0/<local_rank>/stderr.log``; the traceback at its end (the one
  Python prints for an uncaught exception, then exits) becomes an `ErrorFile` naming the
  exception, where it was raised and the local rank.
- **Exit signals.** torchrun logs each failed worker as ``failed (exitcode: -9) local_rank: 0
  (pid: 1238)``; those lines, from the node log of this attempt, say which worker died of which
  signal.
- **The OOM killer.** The kernel log names the processes it killed (``Out of memory: Killed
  process 1238``); read from ``/dev/kmsg`` where this process may (root, or
  ``kernel.dmesg_restrict=0``), matched against the dead workers' pids.

Each reader returns what it found or nothing; none raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
from pathlib import Path

from trainctl.protocol import ErrorFile

TAIL_BYTES = 64 * 1024
"""How much of each rank's stderr is read (the end: an uncaught exception is the last thing a
process prints)."""
TRAILING_LINES = 20
"""The exception line must be among this many last lines of the log (else the traceback was
printed and handled, and the process died of something else later)."""

_TRACEBACK = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
_EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)?)(:|$)")
_WORKER_FAILED = re.compile(
    r"failed \(exitcode: (?P<code>-?\d+)\) local_rank: (?P<rank>\d+) \(pid: (?P<pid>\d+)\)"
)
_OOM = re.compile(r"(?:Killed process|oom-kill:.*?pid=)\s*(?P<pid>\d+)")


def _library(path: str) -> bool:
    return "site-packages" in path or "/lib/python" in path or path.startswith("<")


_PREFIX = re.compile(r"^\[(?:rank|default)(?P<rank>\d+)\]:\s?")
"""What torch puts before each stderr line: ``[rank3]: `` once the process group is up (its
exception hook), ``[default0]:`` from torchrun's tee."""


def _unprefixed(text: str) -> tuple[list[str], str | None]:
    """The lines without torch's prefixes, and the global rank a ``[rankN]:`` prefix named."""
    lines, rank = [], None
    for line in text.rstrip("\n").splitlines():
        match = _PREFIX.match(line)
        while match:
            if line.startswith("[rank"):
                rank = match["rank"]
            line = line[match.end() :]
            match = _PREFIX.match(line)
        lines.append(line)
    return lines, rank


def last_traceback(text: str) -> str | None:
    """The uncaught exception at the end of a process's stderr, as one line: ``Type: message
    (raised at file:line in function)``, the frame being the innermost one of the user's code
    (outside the Python library and site-packages) or else the innermost one. None when the
    text does not end with a traceback."""
    lines, _ = _unprefixed(text)
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        return None
    block = lines[starts[-1] + 1 :]
    frames = [m for m in (_FRAME.match(line) for line in block) if m]
    exception = None
    for index, line in enumerate(block):
        if line and not line[0].isspace() and _EXCEPTION.match(line):
            exception, at = line.strip(), starts[-1] + 1 + index
    if exception is None or at < len(lines) - TRAILING_LINES:
        return None
    if not frames:
        return exception
    own = [f for f in frames if not _library(f["file"])]
    frame = (own or frames)[-1]
    return f"{exception} (raised at {frame['file']}:{frame['line']} in {frame['func']})"


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return handle.read().decode(errors="replace")


def traceback_errors(log_dir: str, known: tuple[ErrorFile, ...]) -> tuple[ErrorFile, ...]:
    """An `ErrorFile` per local rank whose stderr ends with a traceback and that left no error
    file of its own (`known`)."""
    covered = {e.local_rank for e in known}
    found = []
    for path in sorted(Path(log_dir).rglob("stderr.log")):
        local_rank = path.parent.name
        if local_rank in covered:
            continue
        try:
            text, when = _tail(path), path.stat().st_mtime
        except OSError:
            continue
        exception = last_traceback(text)
        if exception is not None:
            rank = _unprefixed(text)[1]
            who = f"rank {rank}, local rank {local_rank}" if rank else f"local rank {local_rank}"
            message = f"{exception} [{who}, from its stderr]"
            found.append(ErrorFile(str(path), message, when, local_rank))
    return tuple(found)


@dataclasses.dataclass(frozen=True)
class WorkerDeath:
    local_rank: int
    pid: int
    code: int

    def describe(self) -> str:
        if self.code < 0:
            with contextlib.suppress(ValueError):
                name = signal.Signals(-self.code).name
                return f"local rank {self.local_rank} (pid {self.pid}) killed by {name}"
        return f"local rank {self.local_rank} (pid {self.pid}) exited with {self.code}"


def worker_deaths(torchrun_log: str) -> list[WorkerDeath]:
    """The workers torchrun reported failed, from its log lines of one attempt."""
    deaths: dict[int, WorkerDeath] = {}
    for match in _WORKER_FAILED.finditer(torchrun_log):
        death = WorkerDeath(int(match["rank"]), int(match["pid"]), int(match["code"]))
        deaths.setdefault(death.pid, death)
    return list(deaths.values())


def oom_kills(pids: set[int], kmsg: str = "/dev/kmsg") -> list[str]:
    """Kernel log lines saying the OOM killer killed one of `pids` (empty where unreadable)."""
    if not pids:
        return []
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    found = []
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break  # read everything the kernel holds
            except OSError:
                continue  # EPIPE: the ring buffer overwrote a record; carry on
            if not record:
                break
            # /dev/kmsg gives one "prio,seq,time,flags;message" record per read.
            for line in record.splitlines():
                text = line.split(";", 1)[-1].strip()
                match = _OOM.search(text)
                if match and int(match["pid"]) in pids:
                    found.append(text)
    finally:
        os.close(fd)
    return found


def crash_evidence(torchrun_log: str) -> tuple[str, ...]:
    """How this attempt's workers died: exit signals, and the OOM killer's word on them."""
    deaths = worker_deaths(torchrun_log)
    killed = {d.pid for d in deaths if d.code < 0}
    return tuple(d.describe() for d in deaths) + tuple(
        f"kernel: {line}" for line in oom_kills(killed)
    )
