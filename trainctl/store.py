"""The job store: spec, state, events and node verdicts under one fsspec root.

Layout under the storage root (a local path, ``file://`` or ``s3://bucket/prefix``)::

    jobs/<job-id>/spec.yaml          the validated spec (written once)
    jobs/<job-id>/state.json         JobRecord, replaced atomically as a whole
    jobs/<job-id>/events/<t>-<n>-<kind>.json   one object per event, time-ordered names
    jobs/<job-id>/nodes/<node>.json  latest health verdict and evidence per node
    jobs/<job-id>/logs/<node>.log    node logs (local roots; copied up for remote roots)
    checkpoints/<job-id>/step-N/     checkpoints (see trainctl.checkpoint)

Anyone who can read the root can inspect a job with no server running. Writes never modify a
stored object in place: state is written to a temporary name and renamed (local) or replaced by
a single PUT (object stores, where a PUT is atomic); events are written once under new names.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trainctl.errors import NotFoundError, StorageError, UserError
from trainctl.spec import check_job_id, check_storage_url
from trainctl.state import Event, JobRecord

DEFAULT_ROOT = "~/.trainctl"
STORAGE_ENV = "TRAINCTL_STORAGE"


def resolve_storage_root(option: str | None, environ: dict[str, str] | None = None) -> str:
    """`--storage`, else $TRAINCTL_STORAGE, else ~/.trainctl; validated, normalised."""
    env = os.environ if environ is None else environ
    where = "--storage"
    root = option
    if not root:
        root, where = env.get(STORAGE_ENV), STORAGE_ENV
    if not root:
        root, where = DEFAULT_ROOT, "default storage root"
    check_storage_url(root, where=where)
    if root.startswith("file://"):
        root = root[len("file://") :]
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return root.rstrip("/") or "/"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class JobStore:
    """Reads and writes job records under a storage root. Thread-safe for event writes."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root
        self.local = is_local(root)
        self._options = storage_options or {}
        self._fs: Any = None
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------
    def job_url(self, job_id: str) -> str:
        return join(self.root, "jobs", check_job_id(job_id))

    def checkpoint_root(self, job_id: str, override: str | None = None) -> str:
        """Where a job's checkpoints live: the recipe's `checkpoint.storage` or under the root."""
        if override:
            base = override[len("file://") :] if override.startswith("file://") else override
            return join(base.rstrip("/"), job_id)
        return join(self.root, "checkpoints", job_id)

    def local_job_dir(self, job_id: str, create: bool = True) -> Path:
        """A local directory for the job's logs and sockets (inside the store when it is local).

        `create=False`: only the path (a dry run writes nothing)."""
        if self.local:
            path = Path(self.job_url(job_id))
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            path = cache / "trainctl" / check_job_id(job_id)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    # -- low-level I/O -----------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.root, **self._options)
        return self._fs

    def _write_atomic(self, url: str, data: bytes) -> None:
        try:
            if self.local:
                directory = os.path.dirname(url)
                os.makedirs(directory, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, url)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
            else:
                # A single PUT replaces an object atomically: readers see old or new, never half.
                self.fs.pipe_file(url, data)
        except OSError as exc:
            raise StorageError(f"cannot write {url}: {exc}") from exc

    def _write_once(self, url: str, data: bytes) -> None:
        """Write a new object; never replaces an existing one."""
        if self.local:
            os.makedirs(os.path.dirname(url), exist_ok=True)
            with open(url, "xb") as handle:
                handle.write(data)
        else:
            if self.fs.exists(url):
                raise FileExistsError(url)
            self.fs.pipe_file(url, data)

    def _read(self, url: str) -> bytes | None:
        try:
            if self.local:
                with open(url, "rb") as handle:
                    return handle.read()
            return bytes(self.fs.cat_file(url))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {url}: {exc}") from exc

    def _list(self, url: str) -> list[str]:
        """Names (not paths) directly under `url`; empty when it does not exist."""
        try:
            if self.local:
                return sorted(os.listdir(url))
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(url, detail=False))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {url}: {exc}") from exc

    # -- jobs --------------------------------------------------------------------------------
    def exists(self, job_id: str) -> bool:
        return self._read(join(self.job_url(job_id), "state.json")) is not None

    def create(self, record: JobRecord, spec_yaml: str) -> None:
        """Store a new job's spec and first state. Refuses to touch an existing job."""
        if self.exists(record.job_id):
            raise UserError(
                "a job with this id already exists",
                where="--job-id",
                value=record.job_id,
                fix="choose another --job-id, or `trainctl resume` the existing job",
            )
        spec_url = join(self.job_url(record.job_id), "spec.yaml")
        if self._read(spec_url) is None:
            self._write_atomic(spec_url, spec_yaml.encode())
        self.write_state(record)

    def write_state(self, record: JobRecord) -> None:
        record.updated_at = time.time()
        payload = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
        self._write_atomic(join(self.job_url(record.job_id), "state.json"), payload)

    def read_state(self, job_id: str) -> JobRecord:
        raw = self._read(join(self.job_url(job_id), "state.json"))
        if raw is None:
            raise NotFoundError(
                "no such job",
                where=self.root,
                value=job_id,
                fix="run `trainctl list` to see the jobs in this storage root (or pass --storage)",
            )
        return JobRecord.from_json(json.loads(raw))

    def read_spec_text(self, job_id: str) -> str | None:
        raw = self._read(join(self.job_url(job_id), "spec.yaml"))
        return raw.decode() if raw is not None else None

    def list_jobs(self) -> list[str]:
        return [name for name in self._list(join(self.root, "jobs")) if not name.startswith(".")]

    # -- events ------------------------------------------------------------------------------
    def append_event(self, job_id: str, event: Event) -> None:
        """Store one event under a new, time-ordered, unique name."""
        with self._lock:
            seq = next(self._seq)
        kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in event.kind)[:40]
        name = f"{int(event.time * 1e6):017d}-{os.getpid()}-{seq:06d}-{kind}.json"
        url = join(self.job_url(job_id), "events", name)
        self._write_once(url, json.dumps(event.to_json(), sort_keys=True).encode())

    def read_events(self, job_id: str) -> list[Event]:
        directory = join(self.job_url(job_id), "events")
        events = []
        for name in self._list(directory):
            if not name.endswith(".json"):
                continue
            raw = self._read(join(directory, name))
            if raw is not None:
                events.append(Event.from_json(json.loads(raw)))
        events.sort(key=lambda e: e.time)
        return events

    # -- nodes -------------------------------------------------------------------------------
    def write_blocklist(self, job_id: str, entries: dict[str, dict[str, Any]]) -> None:
        """Replace ``blocklist.json`` (node -> reason, cause, since, expires_at) atomically.

        It lives in the job store, so it survives controller restarts, `resume` and requeues.
        """
        payload = json.dumps({"nodes": entries}, indent=2, sort_keys=True).encode()
        self._write_atomic(join(self.job_url(job_id), "blocklist.json"), payload)

    def read_blocklist(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self._read(join(self.job_url(job_id), "blocklist.json"))
        if raw is None:
            return {}
        try:
            nodes = json.loads(raw).get("nodes", {})
        except ValueError as bad:
            raise StorageError(
                f"{self.job_url(job_id)}/blocklist.json is unreadable: {bad}"
            ) from None
        return {str(k): dict(v) for k, v in nodes.items()}

    def write_node(self, job_id: str, node: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        self._write_atomic(join(self.job_url(job_id), "nodes", f"{node}.json"), payload)

    def read_node_verdicts(self, job_id: str) -> dict[str, dict[str, Any]]:
        directory = join(self.job_url(job_id), "nodes")
        verdicts: dict[str, dict[str, Any]] = {}
        for name in self._list(directory):
            if name.endswith(".json"):
                raw = self._read(join(directory, name))
                if raw is not None:
                    verdicts[name[: -len(".json")]] = json.loads(raw)
        return verdicts

    # -- free-form job files (stack dumps, reports) ---------------------------------------------
    def write_job_file(self, job_id: str, relative: str, data: bytes) -> str:
        """Write `jobs/<id>/<relative>` atomically (replacing it whole); returns its URL."""
        parts = [p for p in relative.split("/") if p]
        assert parts and all(p not in (".", "..") for p in parts), relative
        url = join(self.job_url(job_id), *parts)
        self._write_atomic(url, data)
        return url

    # -- logs --------------------------------------------------------------------------------
    def upload_logs(self, job_id: str) -> None:
        """Copy local node logs up to a remote root (no-op for local roots)."""
        if self.local:
            return
        logs = self.local_job_dir(job_id) / "logs"
        for path in sorted(logs.glob("*.log")):
            self._write_atomic(join(self.job_url(job_id), "logs", path.name), path.read_bytes())


def host_name() -> str:
    return socket.gethostname()
