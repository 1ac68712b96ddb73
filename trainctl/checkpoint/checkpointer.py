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
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

import trainctl
from trainctl.checkpoint.collectives import Collectives
from trainctl.checkpoint.dcp_io import (
    CachingSavePlanner,
    StorageReader,
    StorageWriter,
    writer_objects,
)
from trainctl.checkpoint.inspect import (
    check_step_listing_in,
    gc_in,
    read_manifest_in,
    step_numbers_in,
)
from trainctl.checkpoint.layout import manifest_key, step_key
from trainctl.checkpoint.manifest import Manifest, ManifestError, ObjectRecord, validate_objects
from trainctl.checkpoint.retention import RetentionPolicy
from trainctl.checkpoint.staging import Staged, Stager
from trainctl.checkpoint.step_save import (
    ALREADY_COMMITTED,
    LEFTOVER,
    PREPARED,
    EarlyMetadata,
    save_step,
)
from trainctl.checkpoint.storage import MIB, Storage, TransferConfig, open_storage
from trainctl.errors import TrainctlError

log = logging.getLogger(__name__)

# DCP warns on every save/load without a process group; one process (tests, the CLI, a
# notebook) is a supported mode here, so the warning is noise.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or uninitialized",
    category=UserWarning,
)

EventCallback = Callable[[str, dict[str, Any]], None]

CHECKPOINT_COMMITTED = "checkpoint_committed"
CHECKPOINT_FAILED = "checkpoint_failed"
CHECKPOINT_SKIPPED = "checkpoint_skipped"
CHECKPOINT_RESTORED = "checkpoint_restored"
RESTORE_SKIPPED = "restore_skipped"
GC_DELETED = "gc_deleted"
GC_FAILED = "gc_failed"


class RestoreError(TrainctlError):
    """No step could be restored after at least one load had started writing into the state:
    the in-memory state may be partly overwritten, so training must not go on from it."""


@dataclass(frozen=True)
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


def _stall(staged: Staged, called: float) -> float:
    """How long `save` blocked its caller (until now if the copy has not finished)."""
    return (staged.copied_at or time.perf_counter()) - called


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
        max_attempts: attempts per storage request (exponential backoff between them).
        on_event: receives ``(name, fields)`` on rank 0; must be thread-safe.
        process_group: group for checkpoint collectives; default: a new gloo group (when
            torch.distributed is initialised), never the training group.
        collective_timeout_s: how long a checkpoint collective waits for a missing rank.
        thread_count: DCP writer threads (= shard files) per rank.
        pin_memory: pin the staging buffers (default: when CUDA is available).
    """

    def __init__(
        self,
        ckpt_root: str,
        *,
        interval_steps: int,
        keep_last: int = 3,
        keep_every: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        part_size: int = 64 * MIB,
        concurrency: int = 8,
        direct_io: bool = True,
        max_attempts: int = 5,
        on_event: EventCallback | None = None,
        process_group: dist.ProcessGroup | None = None,
        collective_timeout_s: float = 600.0,
        thread_count: int = 1,
        pin_memory: bool | None = None,
    ) -> None:
        if interval_steps < 0:
            raise ValueError(f"interval_steps must be >= 0, got {interval_steps}")
        self.ckpt_root = ckpt_root.rstrip("/")
        self.interval_steps = interval_steps
        self.policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        self.storage: Storage = open_storage(
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
            return SaveOutcome(step, "failed", reason, stall_s=_stall(staged, called))

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
            return self._commit(step, records, extra, _stall(staged, called), upload_s, committing)

        saved = save_step(
            staged.state,
            writer,
            CachingSavePlanner(self._plan_key, staged),
            self._collectives,
            prepare=lambda: self._prepare_step(step),
            clear=lambda: self._clear_step(step),
            records_of=records_of,
            commit=commit,
            early=self._early_metadata if self.rank == 0 else None,
            plan_known=staged.generation == self._planned_generation,
        )
        if not saved.committed:
            reason = f"step {step} is already committed (never overwritten)"
            self._emit(CHECKPOINT_SKIPPED, {"step": step, "reason": reason})
            return SaveOutcome(step, "skipped", reason, stall_s=_stall(staged, called))
        stall_s = _stall(staged, called)
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

    def _prepare_step(self, step: int) -> str:
        """Rank 0, before writing: is the step committed, or holding a failed save's objects?
        Changes nothing: other ranks may be writing into the step already."""
        try:
            listed = self.storage.list_objects(step_key(step))  # one request; LISTs are fresh
            if manifest_key(step) in listed:
                return ALREADY_COMMITTED
            # Published objects without a manifest: a save of this step failed earlier. They
            # are cleared first, or a smaller world size would leave stale shards of the larger
            # one beside the new ones. Objects still being written are this save's.
            if any(not self.storage.is_temporary(key) for key in listed):
                return LEFTOVER
            return PREPARED
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def _clear_step(self, step: int) -> str:
        """Rank 0, once no rank writes into the step: delete what a failed save left."""
        try:
            self.storage.delete_prefix(step_key(step))
            return PREPARED
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def _commit(
        self,
        step: int,
        records: list[ObjectRecord],
        extra: dict[str, Any],
        stall_s: float,
        upload_s: float,
        commit_started: float,
    ) -> Manifest | str:
        """Rank 0: write the manifest last, create-exclusive. Returns it, or why it failed."""
        try:
            problems = validate_objects(step, self.world_size, records)
            if problems:
                return "; ".join(problems)
            manifest = Manifest(
                step=step,
                world_size=self.world_size,
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
            self.storage.put(manifest_key(step), manifest.to_json().encode(), exclusive=True)
            return manifest
        except Exception as error:
            return f"{type(error).__name__}: {error}"

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

    def restore_latest(self, state: Mapping[str, Any]) -> int | None:
        """Load the newest committed, verified step into `state` (in place); returns the step.

        Returns None when there is no checkpoint to restore. Resharding to the current world
        size is DCP's. Every step that is skipped is reported (``restore_skipped``) with why.
        Call on every rank. Raises RestoreError when no step could be loaded after a failed
        load had already written part of `state`.
        """
        self.wait()
        # Newest first, one manifest read per step tried: one LIST here, not a manifest read
        # for every step retained.
        broadcast = self._collectives.broadcast
        candidates = broadcast(step_numbers_in(self.storage) if self.rank == 0 else None)
        touched = False
        for step in sorted(candidates, reverse=True):
            checked = broadcast(self._check_step(step) if self.rank == 0 else None)
            if isinstance(checked, str):
                self._emit(RESTORE_SKIPPED, {"step": step, "reason": checked})
                continue
            started = time.perf_counter()
            self._restoring = {step}
            try:
                touched = True
                reader = StorageReader(self.storage.url(step_key(step)), self.storage, checked)
                # DCP loads in place and writes top-level plain values back into this dict.
                target = state if isinstance(state, dict) else dict(state)
                dcp.load(
                    target,
                    storage_reader=reader,
                    process_group=self._group,
                    no_dist=self._group is None,
                )
            except (Exception, CheckpointException) as error:
                reason = f"failed verification or load: {type(error).__name__}: {error}"
                self._emit(RESTORE_SKIPPED, {"step": step, "reason": reason})
                continue
            finally:
                self._restoring = set()
            self._last_committed = step
            self._emit(
                CHECKPOINT_RESTORED,
                {
                    "step": step,
                    "size_bytes": checked.size_bytes,
                    "saved_world_size": checked.world_size,
                    "world_size": self.world_size,
                    "restore_s": time.perf_counter() - started,
                },
            )
            return step
        if touched:
            raise RestoreError(
                f"no checkpoint under {self.ckpt_root} could be restored, and a failed attempt "
                "may have overwritten part of the state: refusing to continue from it"
            )
        return None

    def _check_step(self, step: int) -> Manifest | str:
        """Rank 0: the manifest when it parses and every object is present with its size."""
        try:
            manifest = read_manifest_in(self.storage, step)
        except FileNotFoundError:
            return "no manifest: the save never committed"
        except (ManifestError, OSError) as error:
            return f"unreadable manifest: {error}"
        problems = check_step_listing_in(self.storage, manifest)
        if problems:
            return "; ".join(f"{problem.path}: {problem.problem}" for problem in problems)
        return manifest

    # ------------------------------------------------------------------------------ plumbing

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
