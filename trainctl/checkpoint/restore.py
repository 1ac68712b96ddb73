"""Restoring a job's newest good checkpoint: newest step first, each one checked (manifest,
objects present with their sizes) on rank 0 and its verdict broadcast, then loaded by DCP
(resharded to the current world size) with every block verified as it is read. A step that
fails either way is skipped with an event saying why; `Checkpointer.restore_latest` calls this.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainctl.checkpoint.collectives import Collectives
from trainctl.checkpoint.dcp_io import StorageReader
from trainctl.checkpoint.inspect import check_step_listing_in, read_manifest_in, step_numbers_in
from trainctl.checkpoint.layout import step_key
from trainctl.checkpoint.manifest import Manifest, ManifestError
from trainctl.checkpoint.storage import Storage
from trainctl.errors import TrainctlError
from trainctl.events import CheckpointRestored, RestoreSkipped

EventCallback = Callable[[str, dict[str, Any]], None]


class RestoreError(TrainctlError):
    """No step could be restored after at least one load had started writing into the state:
    the in-memory state may be partly overwritten, so training must not go on from it."""


@dataclasses.dataclass(frozen=True)
class Restore:
    """What a restore works with (a `Checkpointer`'s storage, group and event sink)."""

    storage: Storage
    ckpt_root: str
    collectives: Collectives
    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    emit: EventCallback
    restoring: set[int]
    """The step being loaded, while it is: retention never deletes it."""
    tier: str = "durable"
    """Named in the events: ``durable`` storage or the ``memory`` tier."""


def restore_newest(restore: Restore, state: Mapping[str, Any]) -> int | None:
    """Load the newest committed, verified step into `state`; returns it (None: none to load).
    Raises RestoreError when none could be loaded after a failed load wrote into `state`."""
    # Newest first, one manifest read per step tried: one LIST here, not a manifest read for
    # every step retained.
    broadcast = restore.collectives.broadcast
    rank0 = restore.rank == 0
    candidates = broadcast(step_numbers_in(restore.storage) if rank0 else None)
    touched = False
    for step in sorted(candidates, reverse=True):
        checked = broadcast(check_step(restore.storage, step) if rank0 else None)
        if isinstance(checked, str):
            restore.emit(
                RestoreSkipped.KIND, {"step": step, "reason": checked, "tier": restore.tier}
            )
            continue
        started = time.perf_counter()
        restore.restoring.add(step)
        try:
            touched = True
            reader = StorageReader(restore.storage.url(step_key(step)), restore.storage, checked)
            # DCP loads in place and writes top-level plain values back into this dict.
            target = state if isinstance(state, dict) else dict(state)
            dcp.load(
                target,
                storage_reader=reader,
                process_group=restore.group,
                no_dist=restore.group is None,
            )
        except (Exception, CheckpointException) as error:
            reason = f"failed verification or load: {type(error).__name__}: {error}"
            restore.emit(
                RestoreSkipped.KIND, {"step": step, "reason": reason, "tier": restore.tier}
            )
            continue
        finally:
            restore.restoring.discard(step)
        restore.emit(
            CheckpointRestored.KIND,
            {
                "step": step,
                "size_bytes": checked.size_bytes,
                "saved_world_size": checked.world_size,
                "world_size": restore.world_size,
                "restore_s": time.perf_counter() - started,
                "tier": restore.tier,
            },
        )
        return step
    if touched:
        raise RestoreError(
            f"no checkpoint under {restore.ckpt_root} could be restored, and a failed attempt "
            "may have overwritten part of the state: refusing to continue from it"
        )
    return None


def check_step(storage: Storage, step: int) -> Manifest | str:
    """Rank 0: the manifest when it parses and every object is present with its size."""
    try:
        manifest = read_manifest_in(storage, step)
    except FileNotFoundError:
        return "no manifest: the save never committed"
    except (ManifestError, OSError) as error:
        return f"unreadable manifest: {error}"
    problems = check_step_listing_in(storage, manifest)
    if problems:
        return "; ".join(f"{problem.path}: {problem.problem}" for problem in problems)
    return manifest
