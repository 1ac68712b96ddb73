"""How a save ends (`SaveOutcome`), and rank 0's steps of committing it: before writing,
whether the step is already committed or holds a failed save's leftovers (`prepare_step`),
clearing those (`clear_step`), and writing the manifest last, create-exclusive
(`write_manifest`). Each step returns a status or why it failed (the save protocol broadcasts
it: `trainctl.checkpoint.step_save`); none raises.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from typing import Any

import trainctl
from trainctl.checkpoint.layout import manifest_key, step_key
from trainctl.checkpoint.manifest import Manifest, ObjectRecord, validate_objects
from trainctl.checkpoint.staging import Staged
from trainctl.checkpoint.step_save import ALREADY_COMMITTED, LEFTOVER, PREPARED
from trainctl.checkpoint.storage import Storage


@dataclasses.dataclass(frozen=True)
class SaveOutcome:
    """How one save ended (the value of the future `save` returns)."""

    step: int
    status: str
    """``committed``, ``failed`` or ``skipped``."""
    reason: str = ""
    stall_s: float = 0.0
    """Time `save` blocked the caller (back-pressure wait included)."""
    durable_s: float = 0.0
    """`save` called → manifest committed."""
    size_bytes: int = 0

    @property
    def committed(self) -> bool:
        return self.status == "committed"


def stall_of(staged: Staged, called: float) -> float:
    """How long `save` blocked its caller (until now if the copy has not finished)."""
    return (staged.copied_at or time.perf_counter()) - called


def prepare_step(storage: Storage, step: int) -> str:
    """Before writing: is the step committed, or holding a failed save's objects? Changes
    nothing: other ranks may be writing into the step already."""
    try:
        listed = storage.list_objects(step_key(step))  # one request; LISTs are fresh
        if manifest_key(step) in listed:
            return ALREADY_COMMITTED
        # Published objects without a manifest: a save of this step failed earlier. They are
        # cleared first, or a smaller world size would leave stale shards of the larger one
        # beside the new ones. Objects still being written are this save's.
        if any(not storage.is_temporary(key) for key in listed):
            return LEFTOVER
        return PREPARED
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def clear_step(storage: Storage, step: int) -> str:
    """Once no rank writes into the step: delete what a failed save left."""
    try:
        storage.delete_prefix(step_key(step))
        return PREPARED
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def write_manifest(
    storage: Storage,
    step: int,
    world_size: int,
    records: list[ObjectRecord],
    extra: dict[str, Any],
    stall_s: float,
    upload_s: float,
    commit_started: float,
) -> Manifest | str:
    """Write the manifest last, create-exclusive. Returns it, or why it failed."""
    try:
        problems = validate_objects(step, world_size, records)
        if problems:
            return "; ".join(problems)
        manifest = Manifest(
            step=step,
            world_size=world_size,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            objects=tuple(sorted(records, key=lambda record: record.path)),
            timings={
                "stall_s": round(stall_s, 6),
                "upload_s": round(upload_s, 6),
                "commit_s": round(time.perf_counter() - commit_started, 6),
            },
            trainctl_version=trainctl.__version__,
            extra=extra,
        )
        storage.put(manifest_key(step), manifest.to_json().encode(), exclusive=True)
        return manifest
    except Exception as error:
        return f"{type(error).__name__}: {error}"
