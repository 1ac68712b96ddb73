"""The memory tier as a training loop uses it (`trainctl.checkpoint.memory` has the design).

`MemoryTier.open` builds a second `Checkpointer` (its own gloo group and upload thread, so a
memory save never waits for, nor delays, a durable one) over the node's tmpfs directory
(``own/``), and a restoring one on the same group over ``restore/``, the step the node's holder
assembled before the workers started (its ``status.json`` names the tier: ``memory`` or
``peer``, and every copy it skipped). Without a holder (one process: tests, notebooks) both are
``own/`` and retention keeps two steps there; with one, the holder drops old steps once they are
replicated. The first `save` checks, with every rank agreeing, that the tmpfs holds the tier
(`memory_budget`, own copies and replicas); when not, the tier turns itself off with one
``checkpoint_failed`` event saying why and what to do, and training goes on with durable
checkpoints alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.holder import STATUS_NAME
from trainctl.checkpoint.memory import MEMORY_TIER, QUIET_EVENTS, host_scope, memory_budget
from trainctl.checkpoint.storage import open_storage
from trainctl.events import CheckpointFailed, RestoreSkipped

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
    """A node's in-memory checkpoints, saved every `interval_steps`."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        root: str,
        on_event: EventSink,
        restorer: Checkpointer | None = None,
        assembly: Mapping[str, Any] | None = None,
        replicas: int = 0,
    ) -> None:
        self.checkpointer = checkpointer
        self.restorer = restorer or checkpointer
        self.assembly = dict(assembly or {})
        """The holder's ``restore/status.json`` (empty: no holder)."""
        self.root = root
        self.replicas = replicas
        self._on_event = on_event
        self._checked = False
        self.enabled = True

    @classmethod
    def open(
        cls,
        root: str,
        interval_steps: int,
        *,
        on_event: EventSink,
        pin_memory: bool | None = None,
        replicas: int = 0,
        collective_timeout_s: float = 600.0,
    ) -> MemoryTier:
        """The tier of the node directory `root` (a collective when torch.distributed is
        initialised: one gloo group shared by the saving and the restoring checkpointer)."""
        assembly = _read_status(os.path.join(root, "restore", STATUS_NAME))
        tier = str(assembly.get("tier") or MEMORY_TIER)
        group = None
        if dist.is_available() and dist.is_initialized():
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))

        def quiet(name: str, fields: dict[str, Any]) -> None:
            if name not in QUIET_EVENTS:
                on_event(name, {"tier": MEMORY_TIER, **fields})

        def checkpointer(folder: str, keep_last: int, interval: int) -> Checkpointer:
            path = os.path.join(root, folder)
            return Checkpointer(
                path,
                interval_steps=interval,
                keep_last=keep_last,
                direct_io=False,
                storage=open_storage(path),
                on_event=quiet,
                process_group=group,
                pin_memory=pin_memory,
                tier=MEMORY_TIER if folder == "own" else tier,
            )

        # With a holder, it drops steps once replicated (a step must outlive its replication).
        saver = checkpointer("own", 1_000_000 if assembly else 2, interval_steps)
        restorer = checkpointer("restore", 2, 0) if assembly else None
        return cls(saver, root, on_event, restorer, assembly, replicas)

    def report_assembly(self) -> None:
        """Say (rank 0) which copies the holder skipped while assembling the restore step."""
        if self.checkpointer.rank != 0:
            return
        for reason in self.assembly.get("skipped") or ():
            self._on_event(RestoreSkipped.KIND, {"reason": str(reason), "tier": MEMORY_TIER})

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
        hosts = self.checkpointer.all_gather(socket.gethostname())
        budget = host_scope(hosts, self.replicas)
        if budget.fits:
            base = os.path.dirname(os.path.dirname(self.root.rstrip("/"))) or "/"
            free = shutil.disk_usage(base if os.path.isdir(base) else "/").free
            shard, neg_free = self.checkpointer.agree_max([state_bytes(state), -free])
            on_host = max(hosts.count(host) for host in hosts)
            budget = memory_budget(shard, on_host, -neg_free, self.replicas)
        if not budget.fits and self.checkpointer.rank == 0:
            self._on_event(CheckpointFailed.KIND, {"error": budget.reason, "tier": MEMORY_TIER})
        return budget.fits

    def close(self) -> None:
        self.checkpointer.close()
        if self.restorer is not self.checkpointer:
            self.restorer.close()


def _read_status(path: str) -> dict[str, Any]:
    try:
        with open(path) as file:
            status = json.load(file)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}
