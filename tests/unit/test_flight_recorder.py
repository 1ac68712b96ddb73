"""NCCL's flight-recorder dumps, read as the agent reads them (recorded in torch's format:
what `torch.distributed.flight_recorder` loads), and the hung rank they name."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from trainctl.health.flight_recorder import (
    Collectives,
    dump_path,
    read_dump,
    read_rank,
    trimmed,
    watchdog_dumps,
    worker_env,
)
from trainctl.recovery.hangs import Hang, SilentRank, localise_hang


def entry(seq: int, state: str, op: str = "nccl:all_reduce", pg: str = "0") -> dict[str, Any]:
    """One collective as ProcessGroupNCCL's recorder writes it (the fields analysers use)."""
    return {
        "record_id": seq,
        "pg_id": int(pg),
        "process_group": (pg, "default_pg" if pg == "0" else "undefined"),
        "collective_seq_id": seq,
        "p2p_seq_id": 0,
        "op_id": seq,
        "profiling_name": op,
        "time_created_ns": 1_000 * seq,
        "input_sizes": [[1024]],
        "input_dtypes": ["Float"],
        "output_sizes": [[1024]],
        "output_dtypes": ["Float"],
        "state": state,
        "time_discovered_started_ns": 1_000 * seq + 10,
        "time_discovered_completed_ns": 1_000 * seq + 20 if state == "completed" else None,
        "retired": state == "completed",
        "timeout_ms": 600_000,
        "is_p2p": False,
        "frames": [{"name": "all_reduce", "filename": "distributed_c10d.py", "line": 2806}],
    }


def dump(*entries: dict[str, Any]) -> bytes:
    return pickle.dumps(
        {
            "version": "2.10",
            "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1]"}},
            "pg_status": {"0": {"last_enqueued_collective": entries[-1]["collective_seq_id"]}},
            "entries": list(entries),
        }
    )


# Rank 0 enqueued all_reduce #12 and waits in it; rank 1 completed #11 and never reached #12.
WAITING = dump(*(entry(s, "completed") for s in range(1, 12)), entry(12, "started"))
BEHIND = dump(*(entry(s, "completed") for s in range(1, 12)))


def test_a_dump_says_the_last_collective_enqueued_and_the_oldest_pending() -> None:
    assert read_dump(WAITING) == Collectives(12, "nccl:all_reduce #12 (started)")
    assert read_dump(BEHIND) == Collectives(11, None)
    # Another process group's collectives do not hide the default one's.
    mixed = dump(entry(3, "completed"), entry(40, "scheduled", pg="1"), entry(4, "started"))
    assert read_dump(mixed) == Collectives(4, "nccl:all_reduce #4 (started)")


def test_anything_but_plain_data_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    assert read_dump(pickle.dumps({"entries": [Payload()]})) is None
    assert not (tmp_path / "pwned").exists()
    assert read_dump(b"not a pickle") is None and read_dump(pickle.dumps([1, 2])) is None


def test_the_agent_points_the_recorder_at_the_stacks_dir_unless_the_recipe_did(
    tmp_path: Path,
) -> None:
    env = worker_env(str(tmp_path), {})
    assert env == {
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "nccl_trace_rank_"),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    }
    # the recipe's env passes NCCL settings through untouched, old names or new
    for name in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"):
        assert "TORCH_FR_BUFFER_SIZE" not in worker_env(str(tmp_path), {name: "100"})
    kept = worker_env(str(tmp_path), {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in kept
    # NCCL writes <prefix><rank>: that is where the agent reads it.
    dump_path(tmp_path, 1).write_bytes(BEHIND)
    assert read_rank(tmp_path, 1) == Collectives(11, None)
    assert read_rank(tmp_path, 0) is None
    # ... and what it sends with the attempt's exit: newest entries, as JSON, source named
    (tmp_path / "nccl_trace_rank_x").write_bytes(BEHIND)  # not a rank: ignored
    dumps = watchdog_dumps(tmp_path)
    assert list(dumps) == ["1"]
    sent = json.loads(dumps["1"])
    assert sent["source"] == "nccl_trace_rank_1"
    assert [e["collective_seq_id"] for e in sent["entries"]] == list(range(1, 12))
    assert json.loads(trimmed(tmp_path, 1, keep=2) or "")["entries"][0]["collective_seq_id"] == 10


def test_the_rank_that_never_enqueued_the_collective_is_named() -> None:
    waiting, behind = read_dump(WAITING), read_dump(BEHIND)
    assert waiting is not None and behind is not None
    ranks = (
        SilentRank(0, "node-0", 7, 5.0, "S", None, waiting.last_seq, waiting.pending),
        SilentRank(1, "node-1", 7, 5.0, "S", None, behind.last_seq, behind.pending),
    )
    node, why = localise_hang(Hang(20.0, 4.0, "hang timeout 4 s", ranks))
    assert node == "node-1"
    assert why == (
        "rank 1 on node-1 never enqueued collective #12 (it stopped at #11) while rank 0 "
        "is waiting in nccl:all_reduce #12 (started) (flight recorder)"
    )
    # Every rank at the same collective: a deadlock, the recorder blames nobody.
    same = tuple(
        SilentRank(r, f"node-{r}", 7, 5.0, "S", None, 12, "nccl:all_reduce #12 (started)")
        for r in (0, 1)
    )
    assert localise_hang(Hang(20.0, 4.0, "hang timeout 4 s", same))[0] is None
