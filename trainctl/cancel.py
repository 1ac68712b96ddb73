"""Cancelling a job from any shell or host that can write its store.

`trainctl cancel JOB` writes a request, ``jobs/<id>/cancel/<request id>.json`` (written once,
never replaced: who, from which host, why, when). The job's controller looks for requests
about once a second (`CancelWatch`), stops every process of the job as it would on a stop
signal, records the job ``cancelled`` with who and why, and exits with
`ExitCode.CANCELLED` (a scheduler must not requeue it). A request is honoured once: `trainctl
resume --force` of a cancelled job records the requests it clears, so the resumed run is not
cancelled again by the same one. Nothing here deletes anything.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import time
import uuid
from typing import Any

from trainctl.store import JobStore, host_name, join

CANCEL = "cancel"
"""The stop a cancel request makes (beside the signal names SIGTERM, SIGUSR1, SIGINT)."""
CHECK_INTERVAL_S = 1.0
"""How often a controller looks for a cancel request (one listing of the job's cancel/)."""


@dataclasses.dataclass(frozen=True)
class CancelRequest:
    id: str
    by: str
    """``user@host`` of the shell that asked."""
    reason: str
    at: float

    def describe(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"cancelled by {self.by}{why}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def request_cancel(store: JobStore, job_id: str, reason: str) -> CancelRequest:
    """Write a cancel request for `job_id` (a new file, written once)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    now = time.time()
    request = CancelRequest(
        id=f"{int(now * 1e6):017d}-{uuid.uuid4().hex[:8]}",
        by=f"{user}@{host_name()}",
        reason=reason,
        at=now,
    )
    url = join(store.job_url(job_id), "cancel", f"{request.id}.json")
    store.files.write_once(url, json.dumps(request.to_json(), sort_keys=True).encode())
    return request


def pending_requests(store: JobStore, job_id: str, cleared: list[str]) -> list[CancelRequest]:
    """The job's cancel requests not yet `cleared` (oldest first); unreadable ones skipped."""
    found = []
    directory = join(store.job_url(job_id), "cancel")
    for name in store.files.list(directory):
        if not name.endswith(".json") or name[: -len(".json")] in cleared:
            continue
        try:
            data = json.loads(store.files.read(join(directory, name)) or b"")
            found.append(
                CancelRequest(
                    id=str(data["id"]),
                    by=str(data["by"]),
                    reason=str(data.get("reason", "")),
                    at=float(data["at"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file is no request
    return found


class CancelWatch:
    """A controller's throttled look for cancel requests."""

    def __init__(self, store: JobStore, job_id: str, cleared: list[str]) -> None:
        self.store = store
        self.job_id = job_id
        self.cleared = cleared
        self.request: CancelRequest | None = None
        self._next = 0.0

    def check(self) -> CancelRequest | None:
        """The first pending request, once found (looked for at most every second)."""
        now = time.monotonic()
        if self.request is None and now >= self._next:
            self._next = now + CHECK_INTERVAL_S
            try:
                pending = pending_requests(self.store, self.job_id, self.cleared)
            except Exception:  # a storage hiccup: look again next time
                pending = []
            self.request = pending[0] if pending else None
        return self.request
