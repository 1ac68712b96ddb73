"""One controller per job, across hosts: a lease in the job store.

``jobs/<id>/lease.json`` names the controller that runs the job (host, pid, the process's
start time, a random holder id) and when it last renewed. `launch` and `resume` take it before
starting anything; the controller renews it every `renew_every_s` from a thread. Every write is
conditional (a local root: under a file lock; S3: ``If-None-Match``/``If-Match`` on the
object's ETag), so of two controllers racing for it exactly one wins.

Another controller may take the lease only when its holder is gone:

- released (the holder ended and said so);
- on this host, its process no longer exists (checked by pid and start time): at once;
- elsewhere, not renewed for `ttl_s` as *this* host's clock measures it (clocks on two hosts
  need not agree, so the holder's own timestamps are never compared with ours). A resume
  therefore watches a foreign lease for up to `ttl_s`: a renewal seen means the holder lives,
  and the resume is refused.

A controller that finds its lease taken (a renewal conflict) has lost the job: `lost` is set,
and it must stop its nodes and write nothing more (`trainctl.recovery.journal` checks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable

from trainctl.errors import UserError
from trainctl.launch.proctree import start_time
from trainctl.store import JobStore, join
from trainctl.store_files import Conflict

DEFAULT_TTL_S = 30.0
"""A lease not renewed for this long (by the observer's clock) may be taken over."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: int
    """The process's start time in clock ticks since boot (/proc/<pid>/stat): pid reuse safe."""
    holder_id: str
    renewed_at: float
    """The holder's wall clock at its last renewal (shown to people, never compared)."""
    ttl_s: float
    released: bool = False

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lease file names; None when it cannot be read (treated as stale)."""
        try:
            data = json.loads(raw)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=int(data.get("started", 0)),
                holder_id=str(data["holder_id"]),
                renewed_at=float(data.get("renewed_at", 0.0)),
                ttl_s=float(data.get("ttl_s", DEFAULT_TTL_S)),
                released=bool(data.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None


class LeaseHeld(UserError):
    """Another controller runs the job (exit code 2: do not retry; watch it instead)."""


class Lease:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        ttl_s: float = DEFAULT_TTL_S,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.url = join(store.job_url(job_id), "lease.json")
        self.ttl_s = ttl_s
        self.renew_every_s = max(0.2, ttl_s / 6)
        self.host = host or os.uname().nodename
        self.pid = os.getpid()
        self.holder_id = uuid.uuid4().hex
        self.clock = clock
        self.lost = threading.Event()
        """Set when another controller took the lease: stop, write nothing more."""
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _document(self, released: bool = False) -> bytes:
        holder = Holder(
            host=self.host,
            pid=self.pid,
            started=start_time(self.pid) or 0,
            holder_id=self.holder_id,
            renewed_at=time.time(),
            ttl_s=self.ttl_s,
            released=released,
        )
        return json.dumps(dataclasses.asdict(holder), sort_keys=True).encode()

    def _gone_here(self, holder: Holder) -> bool:
        """The holder ran on this host and its process is gone."""
        return holder.host == self.host and start_time(holder.pid) != holder.started

    def acquire(self) -> Holder | None:
        """Take the lease; returns the previous holder when one was taken over (None: the
        lease was free). Raises `LeaseHeld` while another controller holds it."""
        seen: tuple[str, float] | None = None  # (tag, when first seen by our clock)
        while True:
            current = self.store.read_tagged(self.url)
            if current is None:
                if self._try(None):
                    return None
                continue
            raw, tag = current
            holder = Holder.parse(raw)
            free = holder is None or holder.released or holder.holder_id == self.holder_id
            if holder is not None and not free and self._gone_here(holder):
                free = True
            if not free and holder is not None:
                if holder.host == self.host:
                    raise self._held(holder)
                if seen is not None and seen[0] != tag:
                    raise self._held(holder)  # renewed while we watched: alive
                if seen is None:
                    seen = (tag, self.clock())
                if self.clock() - seen[1] < max(holder.ttl_s, self.ttl_s):
                    time.sleep(min(0.2, self.renew_every_s))
                    continue
            if self._try(tag):
                return None if holder is None or holder.released else holder
            seen = None

    def _try(self, tag: str | None) -> bool:
        try:
            self._tag = self.store.replace_tagged(self.url, self._document(), tag)
            return True
        except Conflict:
            return False

    def _held(self, holder: Holder) -> LeaseHeld:
        return LeaseHeld(
            "the job's controller is already running",
            where="JOB",
            value=self.job_id,
            fix=f"it runs as {holder.describe()}; watch it with `trainctl status "
            f"{self.job_id}`; resume only after it ended",
        )

    def renew(self) -> bool:
        """Renew now; False (and `lost` set) when another controller took the lease."""
        if self.lost.is_set():
            return False
        try:
            self._tag = self.store.replace_tagged(self.url, self._document(), self._tag)
            return True
        except Conflict:
            self.lost.set()
            return False

    def start_renewing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.renew_every_s):
                try:
                    if not self.renew():
                        return
                except Exception:  # a storage hiccup: try again at the next interval
                    continue

        self._thread = threading.Thread(target=loop, name="lease-renew", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the lease free (unless another controller has it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost.is_set() and self._tag is not None:
            try:
                self.store.replace_tagged(self.url, self._document(released=True), self._tag)
            except Exception:
                pass


@dataclasses.dataclass(frozen=True)
class ControllerSeen:
    """What the job's lease says of its controller, for people (`status`, `list`)."""

    holder: Holder | None
    """None: the lease file is missing or unreadable."""
    last_heard_s: float | None
    """Seconds since its last renewal (by the holder's clock: a hint, never compared for
    ownership, which `Lease.acquire` decides); None when unknown."""
    alive: bool
    """Renewed within its time to live and not released, and not a process gone from this
    host."""

    def describe(self) -> str:
        if self.holder is None:
            return "no controller holds the job's lease"
        heard = "" if self.last_heard_s is None else f", last heard {_age(self.last_heard_s)} ago"
        return f"controller {self.holder.describe()}{heard}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def controller_seen(store: JobStore, job_id: str, now: float | None = None) -> ControllerSeen:
    """Whether the job's controller still renews its lease (a read of ``lease.json``)."""
    now = time.time() if now is None else now
    current = store.read_tagged(join(store.job_url(job_id), "lease.json"))
    holder = Holder.parse(current[0]) if current is not None else None
    if holder is None:
        return ControllerSeen(None, None, False)
    heard = now - holder.renewed_at
    gone_here = holder.host == os.uname().nodename and start_time(holder.pid) != holder.started
    alive = not holder.released and not gone_here and heard <= holder.ttl_s
    return ControllerSeen(holder, heard, alive)
