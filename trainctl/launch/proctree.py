"""Owning a process tree on Linux.

torchrun starts its workers in their own sessions, so killing an agent's process group leaves
the workers running (measured: orphans kept training). trainctl therefore (1) makes the node
agent and the controller child subreapers, so orphaned descendants are re-parented to them
instead of init, (2) tags every process of a job through its environment
(``TRAINCTL_JOB_ID``/``TRAINCTL_NODE``), and (3) kills by walking /proc, not by process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process. Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), None when it is gone or a zombie: with the
    pid, it names one process even after the pid is reused."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and fields[0] not in ("Z", "X") else None


def stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, or None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[1]), fields[0])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def is_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    info = stat(pid)
    return info is not None and info[1] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """Live descendants of `root` (children first, then theirs), excluding zombies."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for pid in _all_pids():
        info = stat(pid)
        if info is None:
            continue
        children.setdefault(info[0], []).append(pid)
        states[pid] = info[1]
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for child in children.get(parent, []):
            found.append(child)
            frontier.append(child)
    return [pid for pid in found if states.get(pid) not in ("Z", "X")]


def environ(pid: int) -> dict[str, str]:
    """A process's initial environment ({} when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def tagged(variable: str, value: str) -> list[int]:
    """Live processes whose environment has `variable=value` (our job/node tags)."""
    needle = f"{variable}={value}".encode()
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = handle.read().split(b"\0")
        except OSError:
            continue
        if needle in env and is_alive(pid):
            found.append(pid)
    return found


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass


def reap_zombie_children(keep: Iterable[int] = ()) -> None:
    """Reap zombies re-parented to us (we are a subreaper), except the pids in `keep`.

    `keep` holds our own Popen children: reaping those here would steal their exit codes.
    """
    me = os.getpid()
    keep_set = set(keep)
    for pid in _all_pids():
        if pid in keep_set:
            continue
        info = stat(pid)
        if info is not None and info[0] == me and info[1] == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_tree(
    pids: Iterable[int],
    grace_s: float,
    keep_reaped: Iterable[int] = (),
    poll_s: float = 0.05,
) -> list[int]:
    """SIGTERM `pids`, wait up to `grace_s` for them to exit, then SIGKILL what is left.

    Returns the pids that had to be killed with SIGKILL.
    """
    targets = [pid for pid in pids if is_alive(pid)]
    signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap_zombie_children(keep_reaped)
        targets = [pid for pid in targets if is_alive(pid)]
        if not targets:
            return []
        time.sleep(poll_s)
    signal_all(targets, signal.SIGKILL)
    reap_zombie_children(keep_reaped)
    return targets
