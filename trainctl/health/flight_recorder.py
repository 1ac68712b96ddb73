"""The flight recorder, read: which collective each rank reached when a job hung.

torch's process groups keep a ring of each rank's recent collectives
(`TORCH_FR_BUFFER_SIZE`, formerly `TORCH_NCCL_TRACE_BUFFER_SIZE`; NCCL's on GPUs, gloo's
too on the CPU). The agent gets it two
ways, both into the attempt's stacks directory, beside the Python stacks:

- **on demand**, when the controller suspects a hang: each worker serves torch's debug
  handlers on a Unix socket (`trainctl.runtime` starts torch's ``_WorkerServer`` on
  ``<TRAINCTL_WORKER_SERVER_DIR>/r<RANK>.sock``) and the agent asks for
  ``dump_nccl_trace_json`` (NCCL), else ``fr_trace_json`` (gloo). The handlers run on C++
  threads: they answer while the rank's Python is stuck, even holding the GIL. Saved as
  ``flight_recorder_rank_<RANK>.json``.
- **from NCCL's watchdog**: with `TORCH_NCCL_DUMP_ON_TIMEOUT=1`, a collective that times out
  (the process group's timeout, `trainctl.runtime.collective_timeout`) dumps to
  ``<TORCH_FR_DUMP_TEMP_FILE><rank>`` before `TORCH_NCCL_ASYNC_ERROR_HANDLING` tears
  the process down: the evidence survives even when no controller asked.

A dump is plain data, as JSON or as a pickle (``version``, ``pg_config``, ``entries``: one dict
per collective with its process group, ``collective_seq_id``, ``profiling_name`` such as
``nccl:all_reduce``, ``state``: scheduled, started or completed, and ``retired`` once torch
let go of it; the format `torch.distributed.flight_recorder` reads).

`read_dump` keeps, per rank, the highest collective it enqueued on the default process group
and the oldest it has not completed. In a hang, the ranks that enqueued collective N wait for
one that never did: that rank is the culprit, whatever its Python stack shows (a GPU stuck in
a kernel looks idle from Python). `trainctl.recovery.hangs` weighs it.

The dump is unpickled with every class refused: plain containers and numbers only, so a file
in the stacks directory cannot run code in the agent.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import os
import pickle
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DUMP_PREFIX = "nccl_trace_rank_"
FETCHED_PREFIX = "flight_recorder_rank_"
TRACE_BUFFER_SIZE = 2000
"""Collectives each rank keeps (torch's default is 0: no recorder)."""
HANDLERS = ("dump_nccl_trace_json", "fr_trace_json")
"""torch's debug handlers that return the recorder: NCCL's (CUDA builds), then the generic
one (gloo), tried in this order."""
FETCH_TIMEOUT_S = 2.0
KEEP_ENTRIES = 64
"""Collectives per rank the job store keeps from a dump (the newest: where the hang is)."""
ALIASES = {
    "TORCH_FR_BUFFER_SIZE": "TORCH_NCCL_TRACE_BUFFER_SIZE",
    "TORCH_FR_DUMP_TEMP_FILE": "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
}
"""The flight recorder's current names and the deprecated NCCL ones torch still reads (a
recipe that sets either keeps its value)."""


def worker_env(stacks_dir: str, environ: Mapping[str, str]) -> dict[str, str]:
    """NCCL's failure settings for a node's workers (what the recipe set wins: its ``env:``
    passes every ``NCCL_*``/``TORCH_NCCL_*`` variable through untouched).

    - the flight recorder on, dumping into the stacks directory when a collective times out;
    - ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``: a failed or timed-out collective tears the process
      down without ``ncclCommAbort`` (which can itself hang on a wedged GPU); the agent sees
      the worker exit and trainctl recovers the job.
    """
    wanted = {
        "TORCH_FR_BUFFER_SIZE": str(TRACE_BUFFER_SIZE),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(Path(stacks_dir) / DUMP_PREFIX),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    }
    return {
        name: value
        for name, value in wanted.items()
        if name not in environ and ALIASES.get(name, name) not in environ
    }


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def call_handler(socket_path: str, handler: str, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """POST ``/handler/<handler>`` to a worker's debug server; the body of a 200 answer.
    Raises OSError (no server, timeout) or ValueError (the handler answered an error)."""
    connection = _UnixHTTPConnection(socket_path, timeout_s)
    try:
        connection.request("POST", f"/handler/{handler}")
        response = connection.getresponse()
        body = response.read()
    except http.client.HTTPException as bad:
        raise OSError(f"{handler}: {bad!r}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(f"{handler}: HTTP {response.status}: {body[:200]!r}")
    return body


def fetch_rank(server_dir: str | Path, rank: int, stacks_dir: str | Path) -> str | None:
    """Ask rank `rank`'s debug server for its flight recorder and save it in `stacks_dir`.
    Returns None when saved, else why not (one line, for the dump's failures)."""
    sock = str(Path(server_dir) / f"r{rank}.sock")
    problems = []
    for handler in HANDLERS:
        try:
            body = call_handler(sock, handler)
        except (OSError, ValueError) as bad:
            problems.append(str(bad) if isinstance(bad, ValueError) else f"{handler}: {bad!r}")
            if isinstance(bad, OSError):
                break  # no server: the next handler cannot answer either
            continue
        target = fetched_path(stacks_dir, rank)
        partial = target.with_suffix(".partial")
        partial.write_bytes(body)
        os.replace(partial, target)
        return None
    return "flight recorder: " + "; ".join(problems)


def fetched_path(stacks_dir: str | Path, rank: int) -> Path:
    return Path(stacks_dir) / f"{FETCHED_PREFIX}{rank}.json"


def dump_path(stacks_dir: str | Path, rank: int) -> Path:
    return Path(stacks_dir) / f"{DUMP_PREFIX}{rank}"


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}: a dump holds plain data only")


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Where one rank's NCCL collectives stood."""

    last_seq: int
    """The highest collective it enqueued on the default process group."""
    pending: str | None
    """The oldest one it had not completed: ``nccl:all_reduce #12 (started)``."""


def read_dump(data: bytes) -> Collectives | None:
    """A rank's dump (JSON or pickle) summarised; None when it holds no collective or is not
    a dump."""
    try:
        dump = _load(data)
    except Exception:  # a truncated, foreign or hostile file: no evidence
        return None
    entries = dump.get("entries") if isinstance(dump, dict) else None
    if not isinstance(entries, list):
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if isinstance(entry, dict) and not entry.get("is_p2p", False):
            group = entry.get("process_group", ("0", ""))
            name = str(group[0]) if isinstance(group, list | tuple) and group else "0"
            if isinstance(entry.get("collective_seq_id"), int):
                groups.setdefault(name, []).append(entry)
    if not groups:
        return None
    ops = groups.get("0") or max(groups.values(), key=len)
    ops.sort(key=lambda e: e["collective_seq_id"])
    # gloo never marks an entry completed; torch retires an entry once its work is done.
    waiting = next((e for e in ops if e.get("state") != "completed" and not e.get("retired")), None)
    pending = (
        None
        if waiting is None
        else f"{waiting.get('profiling_name', '?')} #{waiting['collective_seq_id']} "
        f"({waiting.get('state', '?')})"
    )
    return Collectives(ops[-1]["collective_seq_id"], pending)


def _load(data: bytes) -> Any:
    if data.lstrip()[:1] == b"{":
        return json.loads(data)
    return _PlainData(io.BytesIO(data)).load()


def _newest_first(stacks_dir: str | Path, rank: int) -> list[Path]:
    """The rank's dumps, newest first: the one fetched on demand and NCCL's watchdog's (which
    may come later, when the collective the hang left waiting times out)."""
    found = []
    for path in (fetched_path(stacks_dir, rank), dump_path(stacks_dir, rank)):
        try:
            found.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def trimmed(
    stacks_dir: str | Path, rank: int, keep: int = KEEP_ENTRIES, *, watchdog_only: bool = False
) -> str | None:
    """The rank's newest recorder as JSON with only its newest `keep` entries (None: no
    dump); `watchdog_only`: NCCL's watchdog dump alone."""
    paths = [dump_path(stacks_dir, rank)] if watchdog_only else _newest_first(stacks_dir, rank)
    for path in paths:
        try:
            dump = _load(path.read_bytes())
        except Exception:  # absent, truncated or foreign: try the other, else nothing
            continue
        if isinstance(dump, dict) and isinstance(dump.get("entries"), list):
            dump = {**dump, "entries": dump["entries"][-keep:], "source": path.name}
            return json.dumps(dump, default=repr)
    return None


def watchdog_dumps(stacks_dir: str | Path) -> dict[str, str]:
    """rank -> trimmed recorder, for every dump NCCL's watchdog left in `stacks_dir` (a
    collective timed out or failed: the evidence outlives the process it tore down)."""
    found: dict[str, str] = {}
    for path in sorted(Path(stacks_dir).glob(f"{DUMP_PREFIX}*")):
        rank = path.name[len(DUMP_PREFIX) :]
        if rank.isdigit():
            text = trimmed(stacks_dir, int(rank), watchdog_only=True)
            if text is not None:
                found[rank] = text
    return found


def read_rank(stacks_dir: str | Path, rank: int) -> Collectives | None:
    """The rank's newest recorder in the stacks directory (fetched on demand, or written by
    NCCL's watchdog); None when neither is there."""
    for path in _newest_first(stacks_dir, rank):
        try:
            found = read_dump(path.read_bytes())
        except OSError:
            continue
        if found is not None:
            return found
    return None
