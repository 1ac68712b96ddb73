"""The controller's GPU utilisation recorder: samples in, time series and idle flags out.

Every `GpuUsage` message (a node's GPUs, sampled with each health probe) becomes one row of
the job's GPU time series in the store (``jobs/<id>/gpu/``), written in batches — one object
every `GPU_FLUSH_S` for the whole job, not one per sample or per node, and never an event per
sample. The samples taken while training ran also feed the idle-GPU judgement
(`trainctl.health.utilisation.judge_idle`): a node that starts idling while the others are
busy gets one ``gpu_idle`` event, and one ``gpu_idle_cleared`` when the episode ends.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from trainctl.errors import StorageError
from trainctl.events import GpuIdle, GpuIdleCleared
from trainctl.health.readings import UtilisationSample
from trainctl.health.utilisation import (
    GPU_FLUSH_S,
    RUNNING,
    IdleFinding,
    NodeSample,
    NodeUtilisation,
    judge_idle,
    summarise,
)
from trainctl.recovery.journal import Journal

MAX_BUFFERED_ROWS = 20_000
"""...or as soon as this many are buffered (a 1,024-node job: a few probe intervals)."""
JUDGE_EVERY_S = 1.0
"""The idle judgement runs at most this often, however many nodes report."""


class GpuRecorder:
    def __init__(
        self,
        journal: Journal,
        idle_util_pct: float,
        window_s: float,
        flush_s: float = GPU_FLUSH_S,
    ) -> None:
        self.journal = journal
        self.idle_util_pct = idle_util_pct
        self.window_s = window_s
        self.flush_s = flush_s
        self.idle: dict[str, IdleFinding] = {}
        """Nodes in an idle episode now, with the finding that started it."""
        self._rows: list[dict[str, Any]] = []
        self._first_buffered: float | None = None
        self._recent: dict[str, collections.deque[NodeSample]] = {}
        self._last_judged = float("-inf")
        self.write_errors = 0
        """Flushes the store refused (their samples stayed buffered)."""
        self.last_error: str | None = None

    def add(
        self, node: str, attempt: int | None, phase: str, sample: UtilisationSample, now: float
    ) -> None:
        """Record one node's sample (received at `now`); judge and write when due."""
        row = NodeSample(node, attempt, phase, sample)
        self._rows.append(row.to_json())
        if self._first_buffered is None:
            self._first_buffered = now
        if phase == RUNNING:
            recent = self._recent.setdefault(node, collections.deque())
            recent.append(row)
            while recent and recent[0].time < sample.time - self.window_s:
                recent.popleft()
        if now - self._last_judged >= JUDGE_EVERY_S:
            self._last_judged = now
            self.judge()
        if len(self._rows) >= MAX_BUFFERED_ROWS or now - self._first_buffered >= self.flush_s:
            self.flush(now)

    def judge(self) -> None:
        """Judge every node's recent samples; record the episodes that start or end."""
        samples = [row for recent in self._recent.values() for row in recent]
        summaries = summarise(samples, self.window_s, phases=frozenset({RUNNING}))
        for node, finding in judge_idle(summaries, self.idle_util_pct).items():
            if finding.idle and node not in self.idle:
                self.idle[node] = finding
                self.journal.event(
                    GpuIdle(
                        mean_util_pct=finding.mean_util_pct,
                        min_util_pct=finding.min_util_pct,
                        others_util_pct=finding.others_util_pct,
                        threshold_pct=self.idle_util_pct,
                        window_s=self.window_s,
                        num_samples=finding.num_samples,
                    ),
                    f"GPUs idle: {finding.reason}",
                    node=node,
                )
            elif not finding.idle and node in self.idle:
                del self.idle[node]
                self.journal.event(
                    GpuIdleCleared(
                        mean_util_pct=finding.mean_util_pct,
                        others_util_pct=finding.others_util_pct,
                    ),
                    f"GPUs no longer idle: {finding.reason}",
                    node=node,
                )

    def summaries(self) -> dict[str, NodeUtilisation]:
        """Per node, its GPU use over the recent window of samples taken while training ran."""
        samples = [row for recent in self._recent.values() for row in recent]
        return summarise(samples, self.window_s, phases=frozenset({RUNNING}))

    def flush(self, now: float | None = None) -> None:
        """Write the buffered samples as one object (nothing when none are buffered).

        A store that cannot be written keeps the samples buffered (the newest
        `MAX_BUFFERED_ROWS`) for the next flush: GPU samples are never worth stopping a job.
        """
        rows, self._rows, self._first_buffered = self._rows, [], None
        if not rows:
            return
        when = time.time() if now is None else now
        try:
            self.journal.write_gpu_chunk(rows, when)
        except (StorageError, OSError) as error:
            self.write_errors += 1
            self.last_error = str(error)
            self._rows = rows[-MAX_BUFFERED_ROWS:]
            self._first_buffered = when
