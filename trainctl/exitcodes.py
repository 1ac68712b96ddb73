"""The one table of process exit codes that schedulers act on.

Every trainctl command and the batch scripts it renders exit with one of these codes; the README
documents the same table (a test keeps the two in step).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a trainctl exit status tells a scheduler."""

    FINISHED = 0
    """The job (or command) finished successfully."""
    FAILED = 1
    """The job failed; a retry is allowed (a scheduler may requeue it)."""
    BAD_INPUT = 2
    """Bad input (recipe, flag, URL): never retry, fix the input."""
    GAVE_UP = 3
    """trainctl gave up: crash loop or no progress. Do not requeue."""
    PREEMPTED = 4
    """Preempted or out of time: a checkpoint was taken; requeue me."""
    STORE_CORRUPT = 5
    """The job store holds a file trainctl cannot read (a corrupt or partial state, spec or
    blocklist): fix or restore the file named. Do not requeue: a retry reads the same file."""
    STORAGE_UNREACHABLE = 6
    """The storage endpoint did not answer within the storage timeout
    (``TRAINCTL_STORAGE_TIMEOUT_S``): a network or endpoint outage. A retry may succeed."""
    CANCELLED = 7
    """Someone cancelled the job (`trainctl cancel`): do not requeue."""


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.FINISHED: "finished",
    ExitCode.FAILED: "failed, retry allowed (a scheduler may requeue)",
    ExitCode.BAD_INPUT: "bad input, never retry",
    ExitCode.GAVE_UP: "gave up: crash loop or no progress, do not requeue",
    ExitCode.PREEMPTED: "preempted, checkpoint taken, requeue me",
    ExitCode.STORE_CORRUPT: "job store unreadable (corrupt file named), do not requeue",
    ExitCode.STORAGE_UNREACHABLE: "storage unreachable (endpoint or network), retry allowed",
    ExitCode.CANCELLED: "cancelled (trainctl cancel), do not requeue",
}
