"""The controller's live view: progress records to the store, and ``/metrics`` while it runs.

`LiveView.tick(now)` runs on the controller's loop (every message pump): the progress
recorder writes its view when due, and — when `launch --metrics-port` opened a
`MetricsEndpoint` — a fresh `JobSnapshot` is built from the controller's memory (its record,
the events it stored, its node verdicts, blocklist, GPU and progress views) at most every
`PUBLISH_S` and handed to the endpoint. The scrape thread only reads the latest frozen
snapshot: it never touches the controller's mutable state.
"""

from __future__ import annotations

import dataclasses
import threading
from wsgiref.simple_server import WSGIServer

from trainctl.errors import UserError
from trainctl.events import Event
from trainctl.recovery.gpu_recorder import GpuRecorder
from trainctl.recovery.journal import Journal
from trainctl.recovery.progress_recorder import ProgressRecorder
from trainctl.report.live import JobSnapshot, SnapshotInputs, build_snapshot
from trainctl.report.metrics import serve_metrics

PUBLISH_S = 1.0
"""The snapshot behind ``/metrics`` is rebuilt at most this often."""


@dataclasses.dataclass
class MetricsEndpoint:
    """A running ``/metrics`` server and the snapshot it serves (None until the first)."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread
    latest: JobSnapshot | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def open_metrics(host: str, port: int) -> MetricsEndpoint:
    """Start serving ``/metrics`` on `host`:`port` (0: a free port). Raises `UserError` (exit
    2) when the address cannot be bound, before anything of the job starts."""
    holder: list[MetricsEndpoint] = []
    try:
        server, thread = serve_metrics(lambda: holder[0].latest if holder else None, host, port)
    except OSError as error:
        raise UserError(
            f"cannot serve metrics on {host}:{port}: {error.strerror or error}",
            where="--metrics-port",
            value=str(port),
            fix="pick a free port, or 0 to let trainctl choose one (--metrics-host sets the "
            "address)",
        ) from None
    endpoint = MetricsEndpoint(host, int(server.server_address[1]), server, thread)
    holder.append(endpoint)
    return endpoint


class LiveView:
    def __init__(
        self, journal: Journal, gpu: GpuRecorder, endpoint: MetricsEndpoint | None = None
    ) -> None:
        self.journal = journal
        self.gpu = gpu
        self.progress = ProgressRecorder(journal)
        self.endpoint = endpoint
        self.events: list[Event] = []
        self._last_publish = float("-inf")
        if endpoint is not None:
            # Events stored before this controller (launch's, an earlier controller's), once;
            # from here on the journal hands over every event it stores.
            self.events = list(journal.store.read_events(journal.job_id).events)
            journal.on_event = self.events.append

    def snapshot(self, now: float) -> JobSnapshot:
        """The job at `now` from the controller's memory."""
        blocklist = {node: e.to_json() for node, e in self.journal.blocklist.items()}
        inputs = SnapshotInputs(
            record=self.journal.record,
            events=list(self.events),
            verdicts=dict(self.journal.node_documents),
            blocklist=blocklist,
            gpu=self.gpu.summaries(),
            progress=self.progress.view(now),
        )
        return build_snapshot(inputs, now)

    def tick(self, now: float) -> None:
        self.progress.tick(now)
        if self.endpoint is not None and now - self._last_publish >= PUBLISH_S:
            self._last_publish = now
            self.endpoint.latest = self.snapshot(now)

    def close(self, now: float) -> None:
        """The last progress write and the final snapshot; then the endpoint stops."""
        self.progress.flush(now)
        if self.endpoint is not None:
            try:
                self.endpoint.latest = self.snapshot(now)
            finally:
                self.endpoint.close()
