"""The job store: spec, state, events, node verdicts, blocklist and lease under one fsspec root.

Layout under the storage root (a local path, ``file://`` or ``s3://bucket/prefix``)::

    jobs/<job-id>/spec.yaml          the validated spec, secrets redacted (written once)
    jobs/<job-id>/state.json         the job-level fields of the JobRecord (version 3), replaced
                                     atomically; its nodes and attempts are pieces beside it
                                     (`trainctl.state_pieces`), each rewritten only when it
                                     changed, so no write grows with N or with the job's age:
    jobs/<job-id>/node-shards/<k>.json   the records of nodes 64k .. 64k+63, in record order
    jobs/<job-id>/attempts/<n>.json  attempt n, without its node list
    jobs/<job-id>/attempts/<n>.nodes.json   attempt n's node list, written when it starts
    jobs/<job-id>/events/<t>-<pid>-<n>-<kind>.json   one typed event per object, time-ordered
    jobs/<job-id>/nodes/<node>.json  latest health verdict and evidence per node
    jobs/<job-id>/gpu/<t>-<pid>-<n>.jsonl.gz   GPU utilisation samples, one gzip'd JSON line
                                     per node sample, many per object (`write_gpu_chunk`)
    jobs/<job-id>/progress/<t>-<pid>-<n>.jsonl.gz   live progress: each node's step, step
                                     times and last heartbeat, the whole job per object
                                     (`write_progress_chunk`; readers take the newest)
    jobs/<job-id>/blocklist.json     excluded nodes, why and until when
    jobs/<job-id>/lease.json         which controller runs the job (`trainctl.lease`)
    jobs/<job-id>/logs/<node>.log    node logs (local roots; copied up for remote roots)
    checkpoints/<job-id>/step-N/     checkpoints (see trainctl.checkpoint)

Anyone who can read the root can inspect a job with no server running. Nothing is written in
place (`trainctl.store_files`): state.json and each piece are replaced whole (pieces first,
state.json last, so it never names a piece that is not there), an event is written whole
under a new name or not at all. A file that cannot be read raises `CorruptStoreError` naming
it (state and its pieces, spec, blocklist), or is skipped with a `Problem` the caller shows as
a warning (events, node verdicts).
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainctl.errors import CorruptStoreError, NotFoundError, UserError
from trainctl.events import BadEvent, Event
from trainctl.spec import check_job_id, check_storage_url
from trainctl.state import JobRecord
from trainctl.state_pieces import StateWriter, read_record
from trainctl.storage_errors import storage_timeout_s
from trainctl.store_files import StoreFiles, is_local

DEFAULT_ROOT = "~/.trainctl"


def resolve_storage_root(option: str | None, environ: dict[str, str] | None = None) -> str:
    """`--storage`, else $TRAINCTL_STORAGE, else ~/.trainctl; validated, normalised."""
    from trainctl.protocol import Env

    env = os.environ if environ is None else environ
    where = "--storage"
    root = option
    if not root:
        root, where = env.get(Env.STORAGE), Env.STORAGE
    if not root:
        root, where = DEFAULT_ROOT, "default storage root"
    check_storage_url(root, where=where)
    if root.startswith("file://"):
        root = root[len("file://") :]
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return root.rstrip("/") or "/"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclasses.dataclass(frozen=True)
class Problem:
    """A stored file that was skipped because it cannot be read, and why."""

    url: str
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: skipped: {self.reason}"


@dataclasses.dataclass(frozen=True)
class EventLog:
    """A job's readable events in time order, and the event files that were skipped."""

    events: list[Event]
    problems: list[Problem]


class JobStore:
    """Reads and writes job records under a storage root. Thread-safe for event writes."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """`timeout_s`: how long a storage request may take (default: the user's
        $TRAINCTL_STORAGE_TIMEOUT_S, read here, where a command opens its store)."""
        self.root = root
        self.local = is_local(root)
        timeout = storage_timeout_s() if timeout_s is None else timeout_s
        self.files = StoreFiles(root, storage_options, timeout)
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

    def check_root(self, create: bool = False) -> None:
        """Raise a `StorageError` naming the root and the fix when it cannot be used (missing
        local directory unless `create`; S3: no credentials, unreachable, missing or denied
        bucket). Commands call it first, so the store's trouble is one message, not a
        traceback or an empty answer."""
        self.files.check_root(create)

    # -- jobs --------------------------------------------------------------------------------
    def exists(self, job_id: str) -> bool:
        return self.files.read(join(self.job_url(job_id), "state.json")) is not None

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
        if self.files.read(spec_url) is None:
            self.files.write_atomic(spec_url, spec_yaml.encode())
        self.write_state(record)

    def write_state(
        self, record: JobRecord, scrub: Callable[[Any], Any] = lambda data: data
    ) -> None:
        """Store the whole `record`, every piece (passed through `scrub` first: the journal
        takes the job's secret values out of every reason and message): O(N), for a job's
        creation and the launch paths; a running job's journal writes through its own
        `state_writer`, which writes only what changed."""
        self.state_writer(record.job_id).write(record, scrub)

    def state_writer(self, job_id: str) -> StateWriter:
        """A writer of the job's record that writes only the pieces changed since its last
        write (`trainctl.state_pieces.StateWriter`); it stamps ``updated_at``."""
        return StateWriter(self.files, self.job_url(job_id))

    def require_job(self, job_id: str) -> None:
        """Raise `NotFoundError` (exit 2) unless the job exists under this root."""
        if not self.exists(job_id):
            raise self._no_such_job(job_id)

    def _no_such_job(self, job_id: str) -> NotFoundError:
        return NotFoundError(
            "no such job",
            where=self.root,
            value=job_id,
            fix="run `trainctl list` to see the jobs in this storage root (or pass --storage)",
        )

    def read_state(self, job_id: str) -> JobRecord:
        """The job's whole record, assembled from ``state.json`` and its pieces (or a version
        1/2 ``state.json`` as it is). Raises `NotFoundError` for an unknown job and
        `CorruptStoreError` naming a piece that is missing or does not fit."""
        record = read_record(self.files, self.job_url(job_id))
        if record is None:
            raise self._no_such_job(job_id)
        return record

    def read_spec_text(self, job_id: str) -> str | None:
        raw = self.files.read(join(self.job_url(job_id), "spec.yaml"))
        return raw.decode(errors="replace") if raw is not None else None

    def list_jobs(self) -> list[str]:
        return [
            name for name in self.files.list(join(self.root, "jobs")) if not name.startswith(".")
        ]

    # -- events ------------------------------------------------------------------------------
    def append_event(self, job_id: str, event: Event) -> None:
        """Store one event under a new, time-ordered, unique name (whole or not at all)."""
        with self._lock:
            seq = next(self._seq)
        kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in event.kind)[:40]
        name = f"{int(event.time * 1e6):017d}-{os.getpid()}-{seq:06d}-{kind}.json"
        url = join(self.job_url(job_id), "events", name)
        self.files.write_once(url, json.dumps(event.to_json(), sort_keys=True).encode())

    def read_events(self, job_id: str) -> EventLog:
        """Every readable event in time order; unreadable ones are listed as problems."""
        directory = join(self.job_url(job_id), "events")
        events: list[Event] = []
        problems: list[Problem] = []
        for name in self.files.list(directory):
            if not name.endswith(".json") or name.startswith("."):
                continue
            url = join(directory, name)
            raw = self.files.read(url)
            if raw is None:
                continue
            try:
                events.append(Event.from_json(json.loads(raw)))
            except ValueError as bad:  # BadEvent, or not JSON (a partial write)
                problems.append(Problem(url, str(bad) if isinstance(bad, BadEvent) else "not JSON"))
        events.sort(key=lambda e: e.time)
        return EventLog(events, problems)

    # -- GPU utilisation samples --------------------------------------------------------------
    def write_gpu_chunk(self, job_id: str, rows: list[dict[str, Any]], now: float) -> None:
        """Store a batch of GPU samples (each row has a ``time`` <= `now`) as one new object.

        Object stores cannot append, and one object per sample would be millions of objects on
        a big job, so the controller batches: a chunk's name starts with `now` (microseconds),
        so chunks sort by time and a reader after the last N seconds skips older ones unread.
        Written once, gzip'd JSON lines, whole or not at all.
        """
        if not rows:
            return
        with self._lock:
            seq = next(self._seq)
        name = f"{int(now * 1e6):017d}-{os.getpid()}-{seq:06d}.jsonl.gz"
        lines = b"".join(json.dumps(row, sort_keys=True).encode() + b"\n" for row in rows)
        payload = gzip.compress(lines, compresslevel=6, mtime=0)
        self.files.write_once(join(self.job_url(job_id), "gpu", name), payload)

    def read_gpu_rows(
        self, job_id: str, last_s: float | None = None
    ) -> tuple[list[dict[str, Any]], list[Problem]]:
        """Stored GPU sample rows (JSON objects), in chunk order: every one, or with `last_s`
        only the chunks written within `last_s` seconds before the newest chunk (a chunk's rows
        may start up to a flush interval before it was written). A chunk that is not gzip'd
        JSON lines is listed as a problem; the readable lines of a damaged one are kept."""
        directory = join(self.job_url(job_id), "gpu")
        rows: list[dict[str, Any]] = []
        problems: list[Problem] = []
        chunks = [
            (int(name.split("-", 1)[0]) / 1e6, name)
            for name in self.files.list(directory)
            if name.endswith(".jsonl.gz") and name.split("-", 1)[0].isdigit()
        ]
        newest = max((written for written, _ in chunks), default=0.0)
        for written, name in chunks:
            if last_s is not None and written < newest - last_s:
                continue
            url = join(directory, name)
            raw = self.files.read(url)
            if raw is None:
                continue
            try:
                text = gzip.decompress(raw)
            except (OSError, EOFError) as bad:
                problems.append(Problem(url, f"not gzip ({bad})"))
                continue
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    problems.append(Problem(url, f"line {number} is not a JSON object"))
        return rows, problems

    # -- live progress (`trainctl top`, `trainctl metrics`) ------------------------------------
    def write_progress_chunk(self, job_id: str, rows: list[dict[str, Any]], now: float) -> None:
        """Store the controller's whole live progress view (one row per node, one for the job)
        as one new object named by `now`: written once, never rewritten, so a write costs the
        same at any job age, and readers need only the newest object."""
        with self._lock:
            seq = next(self._seq)
        name = f"{int(now * 1e6):017d}-{os.getpid()}-{seq:06d}.jsonl.gz"
        lines = b"".join(json.dumps(row, sort_keys=True).encode() + b"\n" for row in rows)
        payload = gzip.compress(lines, compresslevel=6, mtime=0)
        self.files.write_once(join(self.job_url(job_id), "progress", name), payload)

    def read_progress_rows(self, job_id: str) -> tuple[list[dict[str, Any]], list[Problem]]:
        """The rows of the newest readable progress object ([] when there is none); objects
        that do not read as gzip'd JSON lines are listed as problems and the next older one
        is tried."""
        directory = join(self.job_url(job_id), "progress")
        names = sorted(
            (n for n in self.files.list(directory) if n.endswith(".jsonl.gz") and n[:1].isdigit()),
            key=lambda n: (int(n.split("-", 1)[0]), n),
        )
        problems: list[Problem] = []
        for name in reversed(names):
            url = join(directory, name)
            raw = self.files.read(url)
            if raw is None:
                continue
            try:
                rows = [json.loads(line) for line in gzip.decompress(raw).splitlines()]
            except (OSError, EOFError, ValueError) as bad:
                problems.append(Problem(url, f"not gzip'd JSON lines ({bad})"))
                continue
            return [row for row in rows if isinstance(row, dict)], problems
        return [], problems

    # -- nodes -------------------------------------------------------------------------------
    def write_blocklist(self, job_id: str, entries: dict[str, dict[str, Any]]) -> None:
        """Replace ``blocklist.json`` (node -> reason, cause, since, expires_at) atomically.

        It lives in the job store, so it survives controller restarts, `resume` and requeues.
        """
        payload = json.dumps({"nodes": entries}, indent=2, sort_keys=True).encode()
        self.files.write_atomic(join(self.job_url(job_id), "blocklist.json"), payload)

    def read_blocklist(self, job_id: str) -> dict[str, dict[str, Any]]:
        url = join(self.job_url(job_id), "blocklist.json")
        data = self.files.read_json(url)
        if data is None:
            return {}
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not isinstance(nodes, dict) or not all(isinstance(v, dict) for v in nodes.values()):
            raise CorruptStoreError(url, 'expected {"nodes": {node: {...}}}')
        return {str(k): dict(v) for k, v in nodes.items()}

    def write_node(self, job_id: str, node: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        self.files.write_atomic(
            join(self.job_url(job_id), "nodes", f"{_segment(node)}.json"), payload
        )

    def read_node_verdicts(self, job_id: str) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
        """Each node's ``nodes/<node>.json`` document; unreadable ones listed as problems."""
        directory = join(self.job_url(job_id), "nodes")
        verdicts: dict[str, dict[str, Any]] = {}
        problems: list[Problem] = []
        for name in self.files.list(directory):
            if not name.endswith(".json") or name.startswith("."):
                continue
            url = join(directory, name)
            try:
                data = self.files.read_json(url)
            except CorruptStoreError as bad:
                problems.append(Problem(url, bad.problem))
                continue
            if isinstance(data, dict):
                verdicts[name[: -len(".json")]] = data
            elif data is not None:
                problems.append(Problem(url, "not a JSON object"))
        return verdicts, problems

    # -- free-form job files (stack dumps, reports) ---------------------------------------------
    def write_job_file(self, job_id: str, relative: str, data: bytes) -> str:
        """Write `jobs/<id>/<relative>` atomically (replacing it whole); returns its URL."""
        parts = [_segment(p) for p in relative.split("/") if p]
        if not parts:
            raise ValueError(f"not a file path inside the job: {relative!r}")
        url = join(self.job_url(job_id), *parts)
        self.files.write_atomic(url, data)
        return url

    # -- logs --------------------------------------------------------------------------------
    def read_tagged(self, url: str) -> tuple[bytes, str] | None:
        return self.files.read_tagged(url)

    def replace_tagged(self, url: str, data: bytes, tag: str | None) -> str:
        return self.files.replace_tagged(url, data, tag)

    def upload_logs(self, job_id: str) -> None:
        """Copy local node logs up to a remote root (no-op for local roots)."""
        if self.local:
            return
        logs = self.local_job_dir(job_id) / "logs"
        for path in sorted(logs.glob("*.log")):
            self.files.write_atomic(
                join(self.job_url(job_id), "logs", path.name), path.read_bytes()
            )


def _segment(name: str) -> str:
    """`name` if it is one safe path segment (names from agents and stacks come from outside)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a safe file name: {name!r}")
    return name


def host_name() -> str:
    return socket.gethostname()
