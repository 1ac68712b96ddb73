"""The `Checkpointer`: asynchronous sharded saves that commit, verified restores that reshard.

Save (`save` / `maybe_save`), on every rank:

1. back-pressure: wait for the previous upload (at most one in flight, so host memory holds one
   staged state and the staging buffers can be reused);
2. stage: copy the state into host buffers reused across saves (the only stall);
3. return; a background thread then runs, on a **dedicated gloo process group** (DCP's
   collectives on the training group crashed or deadlocked 3 of 3 times here while training
   ran): DCP's save protocol through trainctl's storage (concurrent multipart, checksums in
   flight), with the commit folded into its collectives (`step_save`): one agreement (rank 0
   clears an uncommitted leftover of the same step first) → shards → one gather of every rank's
   results and object list → rank 0 writes ``.metadata``, then ``manifest.json`` last,
   create-exclusive → retention GC (rank 0).

Restore (`restore_latest`): newest step first, skip (with an event) any step without a manifest,
with missing or truncated objects, or whose blocks fail their checksums while DCP reads them;
load the first good one, resharded by DCP to the current world size.

Events (`on_event(name, fields)`, called on rank 0 only, possibly from the upload thread):
``checkpoint_committed``, ``checkpoint_failed``, ``checkpoint_skipped``, ``checkpoint_restored``,
``restore_skipped``, ``gc_deleted``, ``gc_failed``.

Works without a process group too (one process: tests, the CLI, notebooks).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from trainctl.checkpoint.collectives import Collectives
from trainctl.checkpoint.commit import (
    SaveOutcome,
    clear_step,
    prepare_step,
    stall_of,
    write_manifest,
)
from trainctl.checkpoint.dcp_io import (
    CachingSavePlanner,
    StorageWriter,
    writer_objects,
)
from trainctl.checkpoint.inspect import (
    gc_in,
    step_numbers_in,
)
from trainctl.checkpoint.layout import step_key
from trainctl.checkpoint.manifest import Manifest, ObjectRecord
from trainctl.checkpoint.restore import EventCallback, Restore, RestoreError, restore_newest
from trainctl.checkpoint.retention import RetentionPolicy
from trainctl.checkpoint.staging import Staged, Stager
from trainctl.checkpoint.step_save import (
    EarlyMetadata,
    save_step,
)
from trainctl.checkpoint.storage import (
    MIB,
    Storage,
    TransferConfig,
    open_storage,
)
from trainctl.events import (
    CheckpointCommitted,
    CheckpointFailed,
    CheckpointSkipped,
    GcDeleted,
    GcFailed,
)
from trainctl.spec import CheckpointSpec

__all__ = ["Checkpointer", "RestoreError", "SaveOutcome"]

log = logging.getLogger(__name__)

DEFAULTS = CheckpointSpec()
"""The ``checkpoint:`` section's defaults: the one source of this class's defaults too."""


# DCP warns on every save/load without a process group; one process (tests, the CLI, a
# notebook) is a supported mode here, so the warning is noise.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or uninitialized",
    category=UserWarning,
)

CHECKPOINT_COMMITTED = CheckpointCommitted.KIND
CHECKPOINT_FAILED = CheckpointFailed.KIND
CHECKPOINT_SKIPPED = CheckpointSkipped.KIND
GC_DELETED = GcDeleted.KIND
GC_FAILED = GcFailed.KIND


class Checkpointer:
    """Asynchronous, committed, verified checkpoints of one job under `ckpt_root`.

    Construct it on every rank (it creates a process group collectively when torch.distributed
    is initialised). Not thread-safe: call it from the training thread.

    Args:
        ckpt_root: this job's checkpoint root: a path, ``file://...`` or ``s3://bucket/prefix``.
        interval_steps: `maybe_save` saves when ``step % interval_steps == 0``, step 0 excepted
            (0: never).
        keep_last: committed steps to keep (>= 2).
        keep_every: also keep committed steps that are multiples of this (None: off).
        storage_options: passed to s3fs (``endpoint_url``, ``key``, ``secret``...); without
            them the standard AWS chain applies (``AWS_ENDPOINT_URL``...).
        part_size: bytes per multipart part / ranged read / checksum block.
        concurrency: parts in flight per rank; upload memory <= part_size * concurrency.
        direct_io: local files are written through O_DIRECT where the file system takes it.
        storage: an open storage for `ckpt_root` (then `storage_options`, `part_size`,
            `concurrency`, `direct_io` and `max_attempts` are its own already).
        max_attempts: attempts per storage request (exponential backoff between them).
        on_event: receives ``(name, fields)`` on rank 0; must be thread-safe.
        process_group: group for checkpoint collectives; default: a new gloo group (when
            torch.distributed is initialised), never the training group.
        collective_timeout_s: how long a checkpoint collective waits for a missing rank.
        thread_count: DCP writer threads (= shard files) per rank.
        pin_memory: pin the staging buffers (default: when CUDA is available).
        tier: named in restore events: ``durable`` or ``memory`` (`trainctl.checkpoint.memory`).
    """

    def __init__(
        self,
        ckpt_root: str,
        *,
        interval_steps: int,
        keep_last: int = DEFAULTS.keep_last,
        keep_every: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        part_size: int = DEFAULTS.part_size_mb * MIB,
        concurrency: int = DEFAULTS.concurrency,
        direct_io: bool = DEFAULTS.direct_io,
        storage: Storage | None = None,
        max_attempts: int = 5,
        on_event: EventCallback | None = None,
        process_group: dist.ProcessGroup | None = None,
        collective_timeout_s: float = 600.0,
        thread_count: int = 1,
        pin_memory: bool | None = None,
        tier: str = "durable",
    ) -> None:
        if interval_steps < 0:
            raise ValueError(f"interval_steps must be >= 0, got {interval_steps}")
        self.ckpt_root = ckpt_root.rstrip("/")
        self.interval_steps = interval_steps
        self.policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        self.storage: Storage = storage or open_storage(
            self.ckpt_root,
            storage_options=storage_options,
            config=TransferConfig(
                part_size=part_size,
                concurrency=concurrency,
                max_attempts=max_attempts,
                direct_io=direct_io,
            ),
        )
        self.thread_count = thread_count
        self.tier = tier
        self._on_event = on_event
        self._distributed = dist.is_available() and dist.is_initialized()
        if self._distributed and process_group is None:
            # Collective call: every rank constructs its Checkpointer at the same point.
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))
            assert isinstance(group, dist.ProcessGroup), "every rank is a member of this group"
            process_group = group
        self._group = process_group if self._distributed else None
        self.rank = dist.get_rank(self._group) if self._group is not None else 0
        self.world_size = dist.get_world_size(self._group) if self._group is not None else 1
        self._collectives = Collectives(self._group)
        self._early_metadata = EarlyMetadata()
        self._planned_generation: int | None = None
        self._stager = Stager(pin_memory=pin_memory)
        self._plan_key = f"trainctl-checkpointer-{uuid.uuid4().hex}"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="trainctl-ckpt-upload")
        self._pending: Future[SaveOutcome] | None = None
        self._last_committed: int | None = None
        self._restoring: set[int] = set()
        self._closed = False
        self._event_lock = threading.Lock()

    @classmethod
    def from_spec(cls, ckpt_root: str, spec: CheckpointSpec, **kwargs: Any) -> Checkpointer:
        """A checkpointer as a recipe's ``checkpoint:`` section says (`kwargs`: the rest)."""
        kwargs.setdefault("storage_options", spec.storage_options or None)
        return cls(
            ckpt_root,
            interval_steps=spec.interval_steps,
            keep_last=spec.keep_last,
            keep_every=spec.keep_every or None,
            part_size=spec.part_size_mb * MIB,
            concurrency=spec.concurrency,
            direct_io=spec.direct_io,
            **kwargs,
        )

    # ------------------------------------------------------------------------------ saving

    @property
    def last_committed_step(self) -> int | None:
        """Newest step this process committed or restored (None before either)."""
        return self._last_committed

    @property
    def staging_bytes(self) -> int:
        """Host memory held by the reused staging buffers."""
        return self._stager.buffer_bytes

    def should_save(self, step: int) -> bool:
        """Whether `maybe_save(step)` would save: ``step > 0 and step % interval_steps == 0``."""
        return self.interval_steps > 0 and step > 0 and step % self.interval_steps == 0

    def maybe_save(
        self, step: int, state: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> Future[SaveOutcome] | None:
        """`save` when `step` is on the interval, else nothing (returns None)."""
        if not self.should_save(step):
            return None
        return self.save(step, state, extra)

    def save(
        self, step: int, state: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> Future[SaveOutcome]:
        """Checkpoint `state` as `step`; returns once it is staged (training may go on).

        `state` maps names to `Stateful`s, tensors, DTensors or plain values, as DCP accepts.
        Plain values and non-DTensor tensors must be identical on every rank (DCP writes one
        copy of replicated items). `extra` (JSON-serialisable) is recorded in the manifest.
        Call on every rank. The future resolves when the save committed, failed or was skipped;
        a failure is also reported as an event and never raises into the training loop.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        called = time.perf_counter()
        self.wait()  # back-pressure: one upload in flight, staging buffers free again
        if self._last_committed is not None and step <= self._last_committed:
            outcome = SaveOutcome(step, "skipped", f"step {self._last_committed} already committed")
            self._emit(CHECKPOINT_SKIPPED, {"step": step, "reason": outcome.reason})
            done: Future[SaveOutcome] = Future()
            done.set_result(outcome)
            return done
        state_dict = {
            key: value.state_dict() if isinstance(value, Stateful) else value
            for key, value in state.items()
        }
        staged = self._stager.begin(state_dict)
        # The upload starts now: it hands off, plans and agrees with the other ranks while the
        # caller copies below, and writes tensors once the copy finished.
        self._pending = self._executor.submit(self._upload, step, staged, called, dict(extra or {}))
        staged.copy()  # the stall; a failure here raises to the caller and fails that upload
        return self._pending

    def wait(self) -> SaveOutcome | None:
        """Block until the in-flight upload (if any) finished; returns its outcome."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _upload(
        self, step: int, staged: Staged, called: float, extra: dict[str, Any]
    ) -> SaveOutcome:
        try:
            return self._upload_and_commit(step, staged, called, extra)
        # CheckpointException (DCP's collective failure) derives from BaseException, not Exception.
        except (Exception, CheckpointException) as error:  # reported, never raised into training
            reason = f"{type(error).__name__}: {error}"
            log.warning("checkpoint of step %d failed: %s", step, reason)
            self._emit(CHECKPOINT_FAILED, {"step": step, "error": reason})
            return SaveOutcome(step, "failed", reason, stall_s=stall_of(staged, called))

    def _upload_and_commit(
        self, step: int, staged: Staged, called: float, extra: dict[str, Any]
    ) -> SaveOutcome:
        step_url = self.storage.url(step_key(step))
        writer = StorageWriter(step_url, self.storage, thread_count=self.thread_count)

        def records_of() -> list[ObjectRecord]:
            return [
                written.to_record(path, self.rank)
                for path, written in writer_objects(writer, step_url).items()
            ]

        def commit(
            records: list[ObjectRecord], upload_s: float, committing: float
        ) -> Manifest | str:
            staged.wait()  # copied already unless the state holds no tensor
            stall_s = stall_of(staged, called)
            return write_manifest(
                self.storage, step, self.world_size, records, extra, stall_s, upload_s, committing
            )

        saved = save_step(
            staged.state,
            writer,
            CachingSavePlanner(self._plan_key, staged),
            self._collectives,
            prepare=lambda: prepare_step(self.storage, step),
            clear=lambda: clear_step(self.storage, step),
            records_of=records_of,
            commit=commit,
            early=self._early_metadata if self.rank == 0 else None,
            plan_known=staged.generation == self._planned_generation,
        )
        if not saved.committed:
            reason = f"step {step} is already committed (never overwritten)"
            self._emit(CHECKPOINT_SKIPPED, {"step": step, "reason": reason})
            return SaveOutcome(step, "skipped", reason, stall_s=stall_of(staged, called))
        stall_s = stall_of(staged, called)
        self._planned_generation = staged.generation  # DCP's cached plan is this layout's
        self._last_committed = step
        durable_s = time.perf_counter() - called
        size = saved.size_bytes
        self._emit(
            CHECKPOINT_COMMITTED,
            {
                "step": step,
                "path": step_url,
                "size_bytes": size,
                "world_size": self.world_size,
                "stall_s": stall_s,
                "upload_s": saved.upload_s,
                "durable_s": durable_s,
            },
        )
        if self.rank == 0:
            self._collect_garbage()
        return SaveOutcome(step, "committed", "", stall_s, durable_s, size)

    def gc(self, dry_run: bool = False) -> list[Any]:
        """Apply retention now (rank 0 acts; other ranks return []). See `inspect.gc_in`."""
        if self.rank != 0:
            return []
        return gc_in(self.storage, self.policy, protected=self._restoring, dry_run=dry_run)

    def _collect_garbage(self) -> None:
        try:
            for action in self.gc():
                self._emit(
                    GC_DELETED,
                    {
                        "path": action.path,
                        "step": action.step,
                        "kind": action.kind,
                        "reason": action.reason,
                    },
                )
        except Exception as error:  # GC failing must not fail the save that committed
            self._emit(GC_FAILED, {"error": f"{type(error).__name__}: {error}"})

    # ---------------------------------------------------------------------------- restoring

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value` in rank order (a collective on this group)."""
        return self._collectives.all_gather(value)

    def agree_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum of `values` over every rank (a collective on this group)."""
        return self._collectives.max_ints(values)

    def newest_listed_step(self) -> int | None:
        """The newest step with a directory (committed or not: unchecked), as rank 0 lists
        it, on every rank (a collective). None when there is none."""
        listed = self._collectives.broadcast(
            step_numbers_in(self.storage) if self.rank == 0 else None
        )
        return max(listed) if listed else None

    def restore_latest(self, state: Mapping[str, Any]) -> int | None:
        """Load the newest committed, verified step into `state` (in place); returns the step.

        Returns None when there is no checkpoint to restore. Resharding to the current world
        size is DCP's. Every step that is skipped is reported (``restore_skipped``) with why.
        Call on every rank. Raises RestoreError when no step could be loaded after a failed
        load had already written part of `state`.
        """
        self.wait()
        step = restore_newest(
            Restore(
                self.storage,
                self.ckpt_root,
                self._collectives,
                self._group,
                self.rank,
                self.world_size,
                self._emit,
                self._restoring,
                self.tier,
            ),
            state,
        )
        if step is not None:
            self._last_committed = step
        return step

    # ------------------------------------------------------------------------------ plumbing

    def emit(self, name: str, fields: dict[str, Any]) -> None:
        """Report an event through `on_event` (rank 0 only; a failing sink is logged)."""
        self._emit(name, fields)

    def _emit(self, name: str, fields: dict[str, Any]) -> None:
        if self.rank != 0 or self._on_event is None:
            return
        with self._event_lock:
            try:
                self._on_event(name, fields)
            except Exception:  # a broken event sink must not break checkpointing
                log.exception("on_event(%s) raised", name)

    def close(self) -> None:
        """Wait for the in-flight upload, then release threads, buffers and connections.

        Does not destroy the process group (the caller's `destroy_process_group` does).
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            self._stager.close()
            self._early_metadata.close()
            self.storage.close()
            CachingSavePlanner.forget(self._plan_key)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
