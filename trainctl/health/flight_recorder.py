"""NCCL's flight recorder, read: which collective each rank reached when a job hung.

On GPUs, torch's NCCL process group keeps a ring of its recent collectives per rank
(`TORCH_NCCL_TRACE_BUFFER_SIZE`) and, with `TORCH_NCCL_DUMP_ON_TIMEOUT=1`, writes it when its
watchdog times out, to ``<TORCH_NCCL_DEBUG_INFO_TEMP_FILE><rank>``. The node agent sets those
three for every worker, the file prefix inside the attempt's stacks directory, so a hang's
dumps lie beside its Python stacks. Each dump is a pickle of plain data (``version``,
``pg_config``, ``entries``: one dict per collective with its process group, ``collective_seq_id``,
``profiling_name`` such as ``nccl:all_reduce``, and ``state``: scheduled, started or completed;
the format `torch.distributed.flight_recorder` reads).

`read_dump` keeps, per rank, the highest collective it enqueued on the default process group
and the oldest it has not completed. In a hang, the ranks that enqueued collective N wait for
one that never did: that rank is the culprit, whatever its Python stack shows (a GPU stuck in
a kernel looks idle from Python). `trainctl.recovery.hangs` weighs it.

The dump is unpickled with every class refused: plain containers and numbers only, so a file
in the stacks directory cannot run code in the agent.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DUMP_PREFIX = "nccl_trace_rank_"
TRACE_BUFFER_SIZE = 2000
"""Collectives each rank keeps (torch's default is 0: no recorder)."""


def worker_env(stacks_dir: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The flight recorder's settings for a node's workers (what the recipe set wins)."""
    wanted = {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(TRACE_BUFFER_SIZE),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(stacks_dir) / DUMP_PREFIX),
    }
    return {k: v for k, v in wanted.items() if k not in environ}


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
    """A rank's dump summarised; None when it holds no collective or is not a dump."""
    try:
        dump = _PlainData(io.BytesIO(data)).load()
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
    waiting = next((e for e in ops if e.get("state") != "completed"), None)
    pending = (
        None
        if waiting is None
        else f"{waiting.get('profiling_name', '?')} #{waiting['collective_seq_id']} "
        f"({waiting.get('state', '?')})"
    )
    return Collectives(ops[-1]["collective_seq_id"], pending)


def read_rank(stacks_dir: str | Path, rank: int) -> Collectives | None:
    """The rank's dump in the stacks directory, if NCCL wrote one."""
    try:
        return read_dump(dump_path(stacks_dir, rank).read_bytes())
    except OSError:
        return None
