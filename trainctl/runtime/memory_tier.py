"""The memory tier as a training loop uses it (`trainctl.checkpoint.memory` has the design).

Saving: every `interval_steps` each rank copies its state into its next slot in the node's
tmpfs directory (`trainctl.checkpoint.slots.SlotWriter`: a fixed, mmap'd file per slot, a record
written after the copy). The save is synchronous and small: no collective, no checksum, no
background thread; when it returns the step is in memory that outlives the worker. With one slot
per copy (``slots: 1``) and replicas, a save is skipped while the slot's step is not yet
replicated (the older whole copy stays; `SlotWriter.skipped` counts them). Skips are said in a
``checkpoint_skipped`` event (tier ``memory``, with how many since the last one): by the first
rank of each node (the ranks sharing a holder), at its first skip and then at most once every
`SKIP_REPORT_S`, so a job whose replication lags says so without an event per step.

The first `save` checks, with every rank agreeing, that the tmpfs holds the tier
(`memory_budget`: own slots and the replicas the node holds); when not, the tier turns itself
off with one ``checkpoint_failed`` event saying why and what to do, and training goes on with
durable checkpoints alone. That check is a collective of every rank, so it is also the barrier
after the restore: no rank writes a slot before every rank finished reading the copies its
restore used (in place, or from a peer by range).

Restoring (`restorer`, for `restore_tiers`): through DCP from ``restore/index.json``, the index
the node's holder wrote before the workers started (its ``status.json`` says what it skipped);
without a holder (no ``status.json``: one process, tests, benchmarks) from the node's own slot
records (`local_restore_index`).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from trainctl.checkpoint.collectives import Collectives
from trainctl.checkpoint.memory import MEMORY_TIER, Budget, host_scope, memory_budget
from trainctl.checkpoint.slot_layout import (
    INDEX_NAME,
    RESTORE_DIR,
    SLOT_COUNT,
    SLOTS_DIR,
    RestoreIndex,
    read_json,
    slot_name,
)
from trainctl.checkpoint.slot_local import local_restore_index
from trainctl.checkpoint.slot_reader import SlotRestorer
from trainctl.checkpoint.slots import SlotError, SlotWriter, flatten, plan_layout
from trainctl.events import CheckpointFailed, CheckpointSkipped, RestoreSkipped

EventSink = Callable[[str, dict[str, Any]], None]
STATUS_NAME = "status.json"
"""``restore/status.json``: the holder's account of its assembly (`trainctl.checkpoint.holder`)."""
SKIP_REPORT_S = 60.0
"""Skipped memory saves are said at most this often per node (the first one at once)."""


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


def index_loader(root: str, holder: bool) -> Callable[[], RestoreIndex | str]:
    """How the node directory `root` names the step to restore: the holder's index, or (no
    holder ran) the node's own slot records."""

    def load() -> RestoreIndex | str:
        value = read_json(os.path.join(root, RESTORE_DIR, INDEX_NAME))
        if isinstance(value, dict):
            return RestoreIndex.from_json(value)
        if holder:
            return "the node's holder assembled no step (restore/index.json absent)"
        return local_restore_index(root)

    return load


class MemoryTier:
    """A node's in-memory checkpoints of this rank, saved every `interval_steps`."""

    def __init__(
        self,
        writer: SlotWriter,
        restorer: SlotRestorer,
        group: dist.ProcessGroup | None,
        interval_steps: int,
        on_event: EventSink,
        assembly: Mapping[str, Any] | None = None,
        replicas: int = 0,
        skip_report_s: float = SKIP_REPORT_S,
    ) -> None:
        self.writer = writer
        self.restorer = restorer
        self.root = os.path.dirname(writer.directory)
        self.interval_steps = interval_steps
        self.assembly = dict(assembly or {})
        """The holder's ``restore/status.json`` (empty: no holder)."""
        self.replicas = replicas
        self._collectives = Collectives(group)
        self.rank = dist.get_rank(group) if group is not None else 0
        self._on_event = on_event
        self._checked = False
        self.enabled = True
        self._skip_report_s = skip_report_s
        self._reports_skips = False
        """Whether this rank says its node's skipped saves (the node's first rank)."""
        self._skips_said = 0
        self._skips_said_at: float | None = None
        self._last_step = 0

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
        attempt: int = 0,
        slots: int = SLOT_COUNT,
        skip_report_s: float = SKIP_REPORT_S,
    ) -> MemoryTier:
        """The tier of the node directory `root` for this rank of `attempt` (a collective when
        torch.distributed is initialised: one gloo group for its agreements and DCP's load).
        `pin_memory` is accepted for compatibility: slots are tmpfs pages, never pinned."""
        assembly = read_json(os.path.join(root, RESTORE_DIR, STATUS_NAME))
        assembly = assembly if isinstance(assembly, dict) else {}
        group = None
        if dist.is_available() and dist.is_initialized():
            made = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))
            assert isinstance(made, dist.ProcessGroup), "every rank is a member of this group"
            group = made
        rank = dist.get_rank(group) if group is not None else 0
        world_size = dist.get_world_size(group) if group is not None else 1
        writer = SlotWriter(root, rank, world_size, attempt, slots, replicas)

        def emit(name: str, fields: dict[str, Any]) -> None:
            on_event(name, {"tier": MEMORY_TIER, **fields})

        restorer = SlotRestorer(index_loader(root, bool(assembly)), group, emit)
        return cls(
            writer, restorer, group, interval_steps, on_event, assembly, replicas, skip_report_s
        )

    def report_assembly(self) -> None:
        """Say (rank 0) which copies the holder skipped while choosing the step to restore."""
        if self.rank != 0:
            return
        for reason in self.assembly.get("skipped") or ():
            self._on_event(RestoreSkipped.KIND, {"reason": str(reason), "tier": MEMORY_TIER})

    def should_save(self, step: int) -> bool:
        return (
            self.enabled
            and self.interval_steps > 0
            and step > 0
            and step % self.interval_steps == 0
        )

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Copy `state` into this rank's next slot as `step`; returns once the slot's record is
        written. Call on every rank (the first call is a collective: the budget check)."""
        if not self.enabled:
            return
        flat = flatten(state)
        if not self._checked:
            self._checked = True
            self.enabled = self._fits(flat)
            if not self.enabled:
                return
        self._last_step = step
        try:
            if self.writer.save(step, flat) is None:
                self._report_skips(step)
        except (OSError, SlotError) as error:  # never raised into training: the tier goes off
            self.enabled = False
            self.writer.close()
            self._on_event(
                CheckpointFailed.KIND,
                {
                    "step": step,
                    "error": f"memory tier off: {type(error).__name__}: {error}",
                    "tier": MEMORY_TIER,
                },
            )

    def _report_skips(self, step: int, final: bool = False) -> None:
        """Say the saves skipped since the last word, when this rank speaks for its node and
        it is time: the first skip, then every `skip_report_s` (`final`: whatever is left)."""
        pending = self.writer.skipped - self._skips_said
        if not self._reports_skips or pending <= 0:
            return
        now = time.monotonic()
        said = self._skips_said_at
        if not final and said is not None and now - said < self._skip_report_s:
            return
        self._skips_said, self._skips_said_at = self.writer.skipped, now
        reason = (
            f"{pending} memory save(s) skipped on {os.path.basename(self.root)} (rank {self.rank}, "
            f"{self.writer.skipped} in all): {self.writer.skip_reason}; with one slot a save "
            "waits for the holder to replicate the last one, so a failure replays the steps "
            "since it (memory.slots: 2 never skips)"
        )
        self._on_event(
            CheckpointSkipped.KIND,
            {"step": step, "reason": reason, "tier": MEMORY_TIER, "skipped": pending},
        )

    def _fits(self, flat: Mapping[str, Any]) -> bool:
        """Whether every rank's slots fit (all ranks agree: one all_gather, one max)."""
        places = self._collectives.all_gather((socket.gethostname(), self.root))
        hosts = [host for host, _root in places]
        # One rank speaks for each node directory (its holder's ranks), simulated nodes too.
        self._reports_skips = places.index(places[self.rank]) == self.rank
        unsupported = ""
        try:
            nbytes = plan_layout(flat, self.rank, 1, 0).nbytes
        except SlotError as error:
            nbytes, unsupported = 0, str(error)
        free = _free_bytes(self.root) + self._own_slot_bytes()
        shard, neg_free, refused = self._collectives.max_ints(
            [nbytes, -free, int(bool(unsupported))]
        )
        if refused:
            reason = unsupported or "another rank's state cannot be laid out in slots"
            budget = Budget(False, f"memory tier off: {reason}")
        else:
            budget = host_scope(hosts, self.replicas)
            if budget.fits:
                on_host = max(hosts.count(host) for host in hosts)
                budget = memory_budget(shard, on_host, -neg_free, self.replicas, self.writer.slots)
        if not budget.fits and self.rank == 0:
            self._on_event(CheckpointFailed.KIND, {"error": budget.reason, "tier": MEMORY_TIER})
        return budget.fits

    def _own_slot_bytes(self) -> int:
        """Bytes this rank's slot files of an earlier attempt hold already (reused)."""
        total = 0
        for slot in range(self.writer.slots):
            path = os.path.join(self.root, SLOTS_DIR, slot_name(self.writer.rank, slot))
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Say the skips not said yet, and unmap the slots."""
        if self.enabled:
            self._report_skips(self._last_step, final=True)
        self.writer.close()


def _free_bytes(root: str) -> int:
    folder = root
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder.rstrip("/"))
    return shutil.disk_usage(folder or "/").free
