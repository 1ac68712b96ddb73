"""Looking at a checkpoint root from outside a job: list, verify, garbage-collect.

These are what `trainctl ckpt ls|verify|gc` call, and what the `Checkpointer` uses for its
own restore scan and post-commit GC. Each URL-level function opens the storage itself; the
`*_in` variants take an open `Storage` so a caller that holds one reuses its connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainctl.checkpoint.checksum import checksum_of
from trainctl.checkpoint.layout import MANIFEST_NAME, manifest_key, parse_step_dir, step_key
from trainctl.checkpoint.manifest import Manifest, ManifestError, ObjectProblem, check_listing
from trainctl.checkpoint.retention import (
    RetentionPolicy,
    StepDecision,
    decide_retention,
    upload_is_orphaned,
)
from trainctl.checkpoint.storage import (
    CorruptObjectError,
    Storage,
    TransferConfig,
    open_storage,
)
from trainctl.storage_errors import storage_timeout_s

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes verified so far, total bytes) as verification advances."""


@dataclass(frozen=True)
class StepInfo:
    """One step directory of a checkpoint root."""

    step: int
    committed: bool
    """True when its manifest exists and parses."""
    size_bytes: int
    """Committed: the manifest's total; uncommitted: what storage lists under the step."""
    world_size: int | None
    """Ranks that wrote it (None when uncommitted)."""
    created_at: str | None
    """Commit time, ISO-8601 UTC (None when uncommitted)."""
    problem: str | None = None
    """Why a manifest that exists could not be read (then `committed` is False)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "committed": self.committed,
            "size_bytes": self.size_bytes,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one committed step."""

    step: int
    ok: bool
    bytes_verified: int
    problems: list[ObjectProblem] = field(default_factory=list)
    """Bad objects (missing, wrong size, checksum mismatch), one entry each."""


@dataclass(frozen=True)
class GcAction:
    """One thing GC deleted (or would delete with `dry_run`) and why."""

    path: str
    """Full URL of the step directory or the object key of the aborted upload."""
    reason: str
    step: int | None
    kind: str
    """``step`` (a step directory) or ``upload`` (an orphaned multipart upload)."""


def read_manifest_in(storage: Storage, step: int) -> Manifest:
    """The manifest of `step`. Raises FileNotFoundError (uncommitted) or ManifestError."""
    return Manifest.from_json(bytes(storage.read(manifest_key(step))))


def step_numbers_in(storage: Storage) -> list[int]:
    """The steps that have a directory under the storage root (committed or not), ascending."""
    return sorted(
        step for step in (parse_step_dir(name) for name in storage.list_dirs()) if step is not None
    )


def scan_steps_in(storage: Storage) -> list[StepInfo]:
    """Every step directory under the storage root, oldest first, with its commit state."""
    infos = []
    for step in step_numbers_in(storage):
        try:
            manifest = read_manifest_in(storage, step)
        except FileNotFoundError:
            listed = storage.list_objects(step_key(step))
            infos.append(StepInfo(step, False, sum(listed.values()), None, None))
            continue
        except (ManifestError, CorruptObjectError) as error:
            listed = storage.list_objects(step_key(step))
            infos.append(StepInfo(step, False, sum(listed.values()), None, None, str(error)))
            continue
        infos.append(
            StepInfo(step, True, manifest.size_bytes, manifest.world_size, manifest.created_at)
        )
    return sorted(infos, key=lambda info: info.step)


def check_step_listing_in(storage: Storage, manifest: Manifest) -> list[ObjectProblem]:
    """Cheap check (one LIST, no data): every manifest object present with its size."""
    prefix = step_key(manifest.step)
    listed = {
        key[len(prefix) :].lstrip("/"): size for key, size in storage.list_objects(prefix).items()
    }
    return check_listing(manifest, listed)


def verify_in(
    storage: Storage, step: int, progress: ProgressCallback | None = None
) -> VerifyResult:
    """Read every object of a committed step and check sizes and checksums.

    Raises FileNotFoundError when the step has no manifest, ManifestError when it is unreadable.
    """
    manifest = read_manifest_in(storage, step)
    problems = list(check_step_listing_in(storage, manifest))
    bad = {problem.path for problem in problems}
    total = manifest.size_bytes
    done = 0
    if progress:
        progress(0, total)
    for record in sorted(manifest.objects, key=lambda r: r.path):
        if record.path not in bad:
            try:
                data = storage.read(f"{step_key(step)}/{record.path}", record=record)
                if checksum_of(data) != record.checksum:
                    problems.append(ObjectProblem(record.path, "whole-object checksum mismatch"))
                elif record.head_size and checksum_of(data[: record.head_size]) != (
                    record.head_checksum
                ):
                    problems.append(ObjectProblem(record.path, "head checksum mismatch"))
            except CorruptObjectError as error:
                problems.append(ObjectProblem(record.path, "; ".join(error.problems)))
            except FileNotFoundError:
                problems.append(ObjectProblem(record.path, "missing"))
        done += record.size
        if progress:
            progress(done, total)
    return VerifyResult(step, not problems, done, problems)


def gc_in(
    storage: Storage,
    policy: RetentionPolicy,
    *,
    protected: Iterable[int] = (),
    dry_run: bool = False,
    on_deleted: Callable[[int, int], None] | None = None,
) -> list[GcAction]:
    """Apply the retention policy: delete steps it rejects and abort orphaned uploads.

    A committed step loses its manifest first, so a concurrent reader sees an uncommitted step,
    never a manifest whose objects are disappearing. Returns what was (or would be) done.
    `on_deleted(done, total)` is called after each step deleted (for a progress display).
    """
    infos = scan_steps_in(storage)
    decisions = decide_retention(
        [info.step for info in infos if info.committed],
        [info.step for info in infos if not info.committed],
        policy,
        protected,
    )
    actions = []
    doomed = [decision for decision in decisions if decision.delete]
    for done, decision in enumerate(doomed, start=1):
        actions.append(
            GcAction(storage.url(step_key(decision.step)), decision.reason, decision.step, "step")
        )
        if not dry_run:
            _delete_step(storage, decision)
            if on_deleted is not None:
                on_deleted(done, len(doomed))
    newest = max((info.step for info in infos if info.committed), default=None)
    for upload in storage.list_uploads():
        step = parse_step_dir(upload.key.split("/", 1)[0])
        if upload_is_orphaned(step, newest):
            reason = f"multipart upload never completed (step {step} <= newest committed {newest})"
            actions.append(GcAction(storage.url(upload.key), reason, step, "upload"))
            if not dry_run:
                storage.abort_upload(upload)
    return actions


def _delete_step(storage: Storage, decision: StepDecision) -> None:
    if decision.committed:
        storage.delete(f"{step_key(decision.step)}/{MANIFEST_NAME}")
    storage.delete_prefix(step_key(decision.step))


def retention_decisions_in(
    storage: Storage, policy: RetentionPolicy, protected: Iterable[int] = ()
) -> list[StepDecision]:
    """What the policy says about every step (kept ones too, with reasons): for `--dry-run`."""
    infos = scan_steps_in(storage)
    return decide_retention(
        [info.step for info in infos if info.committed],
        [info.step for info in infos if not info.committed],
        policy,
        protected,
    )


# ------------------------------------------------------------------ URL-level, for the CLI


def _open(ckpt_root: str, storage_options: Mapping[str, Any] | None) -> Storage:
    # A person waits on these: storage that does not answer fails within the storage timeout.
    config = TransferConfig(give_up_s=storage_timeout_s())
    return open_storage(ckpt_root, storage_options=storage_options, config=config)


def list_steps(ckpt_root: str, storage_options: Mapping[str, Any] | None = None) -> list[StepInfo]:
    """Every step under a checkpoint root, oldest first (committed or not)."""
    storage = _open(ckpt_root, storage_options)
    try:
        return scan_steps_in(storage)
    finally:
        storage.close()


def verify(
    ckpt_root: str,
    step: int,
    progress_callback: ProgressCallback | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyResult:
    """Verify one committed step (see `verify_in`)."""
    storage = _open(ckpt_root, storage_options)
    try:
        return verify_in(storage, step, progress_callback)
    finally:
        storage.close()


def gc(
    ckpt_root: str,
    keep_last: int,
    keep_every: int | None,
    dry_run: bool,
    storage_options: Mapping[str, Any] | None = None,
    on_deleted: Callable[[int, int], None] | None = None,
) -> list[GcAction]:
    """Apply retention to a checkpoint root (see `gc_in`). Raises ValueError for keep_last < 2."""
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    storage = _open(ckpt_root, storage_options)
    try:
        return gc_in(storage, policy, dry_run=dry_run, on_deleted=on_deleted)
    finally:
        storage.close()
