"""Where a checkpoint's objects live under a checkpoint root (pure: names only, no I/O).

A job's checkpoint root holds one directory per step::

    <ckpt_root>/step-000000100/.metadata          DCP's metadata (written by DCP's coordinator)
    <ckpt_root>/step-000000100/__0_0.distcp       DCP's shard files, one or more per rank
    <ckpt_root>/step-000000100/manifest.json      trainctl's commit marker, written last

Step numbers are zero-padded to nine digits so that a plain lexical listing of the root (what an
object store returns) is also the numeric order; steps of 10**9 and beyond still parse, they just
stop sorting lexically, which is why callers sort by the parsed number, never by name.
"""

from __future__ import annotations

import re

STEP_PREFIX = "step-"
STEP_DIGITS = 9
MANIFEST_NAME = "manifest.json"
DCP_METADATA_NAME = ".metadata"

_STEP_DIR_PATTERN = re.compile(r"^step-(\d{9,})$")

MEMORY_BASE = "/dev/shm"
"""Where memory tiers live (`trainctl.checkpoint.memory`): the host's shared-memory tmpfs."""


def memory_root(job_id: str, base: str = MEMORY_BASE) -> str:
    """The job's memory-tier directory on this host (step directories as in durable storage)."""
    return f"{base.rstrip('/')}/trainctl-{job_id}"


def node_memory_root(job_id: str, node: str, base: str = MEMORY_BASE) -> str:
    """One node's memory-tier directory (`trainctl.checkpoint.memory`: own, held, restore)."""
    return f"{memory_root(job_id, base)}/{node}"


def step_dir_name(step: int) -> str:
    """The directory name of `step`, e.g. ``step_dir_name(100) == "step-000000100"``.

    Raises ValueError for a negative step (a caller bug or a bad recipe value).
    """
    if step < 0:
        raise ValueError(f"a checkpoint step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step number of a directory name, or None when `name` is not a step directory.

    Accepts a bare name (``step-000000100``) or a path/URL ending in one (a trailing ``/`` is
    ignored), so listings from any backend can be fed in unchanged.
    """
    base = name.rstrip("/").rsplit("/", 1)[-1]
    match = _STEP_DIR_PATTERN.match(base)
    return int(match.group(1)) if match else None


def join(base: str, *parts: str) -> str:
    """Join a URL or path with key parts using single ``/`` (never `os.path`: ``s3://`` survives).

    Empty parts are skipped: ``join("s3://b/p/", "", "step-000000001")`` is
    ``"s3://b/p/step-000000001"``; ``join("/", "a")`` is ``"/a"``.
    """
    result = base.rstrip("/") or ("/" if base.startswith("/") else "")
    for part in parts:
        piece = part.strip("/")
        if not piece:
            continue
        result = piece if not result else f"{result}{'' if result.endswith('/') else '/'}{piece}"
    return result


def step_key(step: int) -> str:
    """The key prefix of `step` relative to the checkpoint root (same as its directory name)."""
    return step_dir_name(step)


def manifest_key(step: int) -> str:
    """The manifest's key relative to the checkpoint root."""
    return f"{step_dir_name(step)}/{MANIFEST_NAME}"


def object_key(step: int, relative_path: str) -> str:
    """The key of an object (``__0_0.distcp``, ``.metadata``) of `step`, relative to the root."""
    return f"{step_dir_name(step)}/{relative_path}"


def job_checkpoint_root(storage_root: str, job_id: str) -> str:
    """The default checkpoint root of a job: ``<storage_root>/checkpoints/<job_id>``."""
    return join(storage_root, "checkpoints", job_id)
