"""The memory tier as a training loop uses it (`trainctl.checkpoint.memory` has the design).

`MemoryTier.open` builds a second `Checkpointer` (its own gloo group and upload thread, so a
memory save never waits for, nor delays, a durable one) over the job's tmpfs directory. The
first `save` checks, with every rank agreeing, that every rank is on this host (`host_scope`)
and that the tmpfs holds the tier (`memory_budget`); when not, the tier turns itself off with
one ``checkpoint_failed`` event saying why and what to do, and training goes on with durable
checkpoints alone.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import MEMORY_TIER, QUIET_EVENTS, host_scope, memory_budget
from trainctl.checkpoint.storage import open_storage
from trainctl.events import CheckpointFailed

EventSink = Callable[[str, dict[str, Any]], None]


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of this rank's tensors in `state` (Statefuls expanded; DTensors: the local shard)."""
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, Stateful):
            visit(value.state_dict())
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()

    visit(state)
    return total


class MemoryTier:
    """A job's in-memory checkpoints on this host, saved every `interval_steps`."""

    def __init__(self, checkpointer: Checkpointer, root: str, on_event: EventSink) -> None:
        self.checkpointer = checkpointer
        self.root = root
        self._on_event = on_event
        self._checked = False
        self.enabled = True

    @classmethod
    def open(
        cls, root: str, interval_steps: int, *, on_event: EventSink, pin_memory: bool | None = None
    ) -> MemoryTier:
        """The tier under `root` (a collective when torch.distributed is initialised)."""

        def quiet(name: str, fields: dict[str, Any]) -> None:
            if name not in QUIET_EVENTS:
                on_event(name, {**fields, "tier": MEMORY_TIER})

        storage = open_storage(root)
        checkpointer = Checkpointer(
            root,
            interval_steps=interval_steps,
            keep_last=2,
            direct_io=False,
            storage=storage,
            on_event=quiet,
            pin_memory=pin_memory,
            tier=MEMORY_TIER,
        )
        return cls(checkpointer, root, on_event)

    def should_save(self, step: int) -> bool:
        return self.enabled and self.checkpointer.should_save(step)

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Stage `state` for `step` into memory (the upload into tmpfs runs in the background).
        Call on every rank."""
        if not self._checked:
            self._checked = True
            self.enabled = self._fits(state)
            if not self.enabled:
                return
        self.checkpointer.save(step, state, extra={"step": step, "tier": MEMORY_TIER})

    def _fits(self, state: Mapping[str, Any]) -> bool:
        budget = host_scope(self.checkpointer.all_gather(socket.gethostname()))
        if budget.fits:
            free = shutil.disk_usage(os.path.dirname(self.root.rstrip("/")) or "/").free
            shard, neg_free = self.checkpointer.agree_max([state_bytes(state), -free])
            budget = memory_budget(shard, self.checkpointer.world_size, -neg_free)
        if not budget.fits and self.checkpointer.rank == 0:
            self._on_event(CheckpointFailed.KIND, {"error": budget.reason, "tier": MEMORY_TIER})
        return budget.fits

    def close(self) -> None:
        self.checkpointer.close()
