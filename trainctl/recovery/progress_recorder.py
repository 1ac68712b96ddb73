"""The controller's live progress recorder: agents' progress reports in, the job's progress view
out — kept in memory (for ``/metrics``) and written to the store (for `trainctl top` and
`trainctl metrics`).

A write is one new object holding the whole view (`JobStore.write_progress_chunk`), at most
every `PROGRESS_FLUSH_S` and only when something changed: its cost does not grow with the
job's age, nothing is rewritten, and a reader needs only the newest object. A store that
cannot be written is noted and retried at the next flush: progress records never stop a job.
"""

from __future__ import annotations

import collections
import dataclasses

from trainctl.errors import StorageError
from trainctl.protocol import Heartbeat
from trainctl.recovery.journal import Journal
from trainctl.report.progress import (
    NodeProgress,
    ProgressView,
    StepHistogram,
    percentile,
    steps_per_second,
)

PROGRESS_FLUSH_S = 2.0
"""The progress view is written at most this often (or, for a big job, `flush_interval`)."""
FLUSH_NODES_PER_S = 256
"""The view holds a row a node: it is written at most every N / this s."""
STEP_WINDOW = 128
"""Per node, the step times the percentiles are taken over (the most recent ones)."""
UNFOLDED_MAX = 65536
"""Step times held before they are folded into the histogram, at most."""
THROUGHPUT_WINDOW_S = 30.0
"""Throughput is measured over about the last this many seconds."""


@dataclasses.dataclass
class _Node:
    attempt: int | None
    step: int = 0
    beat_at: float = 0.0
    saving: bool = False
    step_times: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=STEP_WINDOW)
    )
    points: collections.deque[tuple[float, int]] = dataclasses.field(
        default_factory=collections.deque
    )
    counted: dict[int, int] = dataclasses.field(default_factory=dict)
    """rank -> the last step whose time went into the statistics (no sample counts twice)."""


def flush_interval(nodes: int) -> float:
    """How often the view of a `nodes`-node job is written: every `PROGRESS_FLUSH_S`, or
    every N / `FLUSH_NODES_PER_S` s (4 s at 1,024 nodes, where a view of 1,024 rows every
    2 s was 10% of the controller's CPU; 16 s at 4,096)."""
    return max(PROGRESS_FLUSH_S, nodes / FLUSH_NODES_PER_S)


class ProgressRecorder:
    def __init__(self, journal: Journal, flush_s: float | None = None) -> None:
        self.journal = journal
        self.flush_s = flush_interval(len(journal.record.nodes)) if flush_s is None else flush_s
        self._histogram = StepHistogram()
        self._unfolded: list[float] = []
        """Step times not yet in the histogram (folded when it is read, not per report: a
        new histogram per report was a fifth of a report's cost)."""
        self._nodes: dict[str, _Node] = {}
        self._changed = False
        self._last_flush = float("-inf")
        self.write_errors = 0
        self.last_error: str | None = None

    def add(self, node: str, attempt: int | None, ranks: dict[str, Heartbeat], now: float) -> None:
        """Fold one progress report of `node` (rank -> latest heartbeat), received at `now`."""
        state = self._nodes.get(node)
        if state is None or state.attempt != attempt:
            state = self._nodes[node] = _Node(attempt)
        fresh: list[float] = []
        counted, step, saving = state.counted, state.step, False
        for raw_rank, beat in ranks.items():
            rank = int(raw_rank)
            last = counted.get(rank, -1)
            samples = beat.samples or ((beat.step, beat.step_time, beat.busy_time),)
            for sample_step, step_time, _busy in samples:
                if step_time is not None and int(sample_step) > last:
                    fresh.append(float(step_time))
                    last = counted[rank] = int(sample_step)
            step = max(step, beat.step)
            saving = saving or beat.saving
        state.step, state.saving = step, saving
        state.beat_at = now
        state.step_times.extend(fresh)
        state.points.append((now, state.step))
        while len(state.points) > 2 and state.points[1][0] <= now - THROUGHPUT_WINDOW_S:
            state.points.popleft()
        self._unfolded += fresh
        if len(self._unfolded) > UNFOLDED_MAX:
            self._histogram = self.histogram
        self._changed = True

    @property
    def histogram(self) -> StepHistogram:
        """The step times of every report so far."""
        if self._unfolded:
            self._histogram = self._histogram.observe(self._unfolded)
            self._unfolded = []
        return self._histogram

    def view(self, now: float | None = None) -> ProgressView:
        """The current view: per node its step, percentiles, throughput and last heartbeat."""
        nodes = {name: self._row(name, state) for name, state in sorted(self._nodes.items())}
        return ProgressView(nodes, self.histogram, now)

    @staticmethod
    def _row(name: str, state: _Node) -> NodeProgress:
        ordered = sorted(state.step_times)  # once for both percentiles (sorted input: O(n))
        return NodeProgress(
            node=name,
            attempt=state.attempt,
            step=state.step,
            beat_at=state.beat_at,
            step_p50_s=percentile(ordered, 0.50),
            step_p99_s=percentile(ordered, 0.99),
            steps_per_s=steps_per_second(state.points),
            saving=state.saving,
        )

    def tick(self, now: float) -> None:
        """Write the view when it changed and the last write is `flush_s` old."""
        if self._changed and now - self._last_flush >= self.flush_s:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Write the view now if anything changed since the last write."""
        if not self._changed:
            return
        self._last_flush = now
        try:
            self.journal.write_progress_chunk(self.view(now).to_rows(), now)
        except (StorageError, OSError) as error:
            self.write_errors += 1
            self.last_error = str(error)
            return
        self._changed = False
