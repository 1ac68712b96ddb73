"""What the controller remembers about progress, fed to the pure detectors in health.progress.

`ProgressWatch` keeps, per rank, the last step, when the controller saw it advance, and the
recent per-step times the agents forward; it asks `derive_hang_timeout`, `detect_hang` and
`detect_stragglers` for decisions. It reads no clock: every call takes `now` (the controller's
monotonic clock, so worker clock skew across hosts cannot fake or hide a hang).

Per-step sample: the rank's *busy* time when the script marks it (`ctx.busy()`), else its
wall-clock step time. Straggler detection compares nodes (the slowest rank of each node per
step) over the most recent steps that every rank has reported.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

from trainctl.health.progress import (
    HangTimeout,
    Hung,
    StragglerPolicy,
    derive_hang_timeout,
    detect_hang,
    detect_stragglers,
    node_step_times,
)
from trainctl.health.verdict import HealthVerdict
from trainctl.protocol import Heartbeat
from trainctl.spec import HealthSpec


@dataclasses.dataclass
class RankProgress:
    node: str
    step: int = 0
    last_progress_at: float = 0.0
    samples: dict[int, float] = dataclasses.field(default_factory=dict)
    """step -> busy (or wall) seconds, the most recent ones only."""
    reports_busy: bool = False
    saving: bool = False
    """The rank's latest heartbeat says a checkpoint save of its step is in progress."""


@dataclasses.dataclass(frozen=True)
class HangCheck:
    """A hang: who is silent and the timeout(s) that applied, with their explanations."""

    hung: list[Hung[int]]
    timeout: HangTimeout


class ProgressWatch:
    def __init__(
        self, health: HealthSpec, nodes: tuple[str, ...], world_size: int, max_steps: int | None
    ) -> None:
        self.health = health
        self.nodes = nodes
        self.world_size = world_size
        self.max_steps = max_steps
        self.ranks: dict[int, RankProgress] = {}
        self.started: dict[str, float] = {}
        self.exited: set[str] = set()
        self.step_times: collections.deque[float] = collections.deque(maxlen=health.hang_window)
        self._new_samples = False

    # -- feeding ---------------------------------------------------------------------------
    def node_started(self, node: str, now: float) -> None:
        self.started.setdefault(node, now)

    def node_exited(self, node: str) -> None:
        self.exited.add(node)

    def record(self, node: str, ranks: Mapping[str, Heartbeat], now: float) -> None:
        """Fold one progress report from `node`'s agent (rank -> latest heartbeat)."""
        for raw_rank, beat in ranks.items():
            rank = int(raw_rank)
            progress = self.ranks.setdefault(rank, RankProgress(node=node))
            progress.saving = beat.saving and beat.step >= progress.step
            if beat.step > progress.step:
                progress.step = beat.step
                progress.last_progress_at = now
            samples = beat.samples or ((beat.step, beat.step_time, beat.busy_time),)
            for sample_step, step_time, busy_time in samples:
                if step_time is not None:
                    self.step_times.append(float(step_time))
                value = busy_time if busy_time is not None else step_time
                if value is not None:
                    progress.samples[int(sample_step)] = float(value)
                    progress.reports_busy = progress.reports_busy or busy_time is not None
                    self._new_samples = True
            keep = 2 * self.health.straggler_window
            for old in sorted(progress.samples)[:-keep]:
                del progress.samples[old]

    # -- hangs -----------------------------------------------------------------------------
    def steady_timeout(self) -> HangTimeout:
        """The hang timeout between steps: pinned by the recipe or derived from step times."""
        return derive_hang_timeout(
            list(self.step_times),
            floor_s=self.health.hang_floor_s,
            k=self.health.hang_k,
            first_step_allowance_s=self.health.first_step_allowance_s,
            pinned_s=self.health.hang_timeout_s,
        )

    def saving_timeout(self) -> HangTimeout:
        """The hang timeout for a rank whose checkpoint save is in progress."""
        return derive_hang_timeout(
            list(self.step_times),
            floor_s=self.health.hang_floor_s,
            k=self.health.hang_k,
            first_step_allowance_s=self.health.first_step_allowance_s,
            checkpoint_allowance_s=self.health.checkpoint_allowance_s,
            saving_checkpoint=True,
            pinned_s=self.health.hang_timeout_s,
        )

    def first_step_timeout(self) -> HangTimeout:
        """Before a rank's first step (imports, rendezvous, model build) the allowance applies."""
        return derive_hang_timeout(
            [],
            floor_s=self.health.hang_floor_s,
            first_step_allowance_s=self.health.first_step_allowance_s,
        )

    def _watched(self) -> dict[int, RankProgress]:
        """Ranks that should still be making progress."""
        return {
            rank: progress
            for rank, progress in self.ranks.items()
            if progress.node not in self.exited
            and (self.max_steps is None or progress.step < self.max_steps)
        }

    def check_hang(self, now: float) -> HangCheck | None:
        """Silent ranks past their timeout, or None. Watches only once every node started."""
        if not self.nodes or any(node not in self.started for node in self.nodes):
            return None
        all_started = max(self.started.values())
        watched = self._watched()
        steady = self.steady_timeout()
        hung = detect_hang(
            now,
            {rank: p.last_progress_at for rank, p in watched.items() if not p.saving},
            steady.timeout_s,
        )
        if hung:
            return HangCheck(hung, steady)
        saving = self.saving_timeout()
        hung = detect_hang(
            now,
            {rank: p.last_progress_at for rank, p in watched.items() if p.saving},
            saving.timeout_s,
        )
        if hung:
            return HangCheck(hung, saving)
        if self.exited:
            return None  # the job is ending: ranks that never reported no longer matter
        unreported = [rank for rank in range(self.world_size) if rank not in self.ranks]
        first = self.first_step_timeout()
        hung = detect_hang(now, dict.fromkeys(unreported, all_started), first.timeout_s)
        return HangCheck(hung, first) if hung else None

    def node_of(self, rank: int) -> str | None:
        progress = self.ranks.get(rank)
        return progress.node if progress else None

    def step_of(self, rank: int) -> int | None:
        progress = self.ranks.get(rank)
        return progress.step if progress else None

    # -- stragglers ------------------------------------------------------------------------
    def has_new_samples(self) -> bool:
        return self._new_samples

    def check_stragglers(self) -> dict[str, HealthVerdict]:
        """A verdict per node over the most recent steps every rank has reported."""
        self._new_samples = False
        ranks = {rank: p for rank, p in self.ranks.items() if p.samples}
        if len({p.node for p in ranks.values()}) < 2:
            return {}
        common = set.intersection(*(set(p.samples) for p in ranks.values()))
        steps = sorted(common)[-self.health.straggler_window :]
        by_rank = {rank: [p.samples[step] for step in steps] for rank, p in ranks.items()}
        by_node = node_step_times(by_rank, {rank: p.node for rank, p in ranks.items()})
        policy = StragglerPolicy(
            factor=self.health.straggler_factor, window=self.health.straggler_window
        )
        measure = "busy" if all(p.reports_busy for p in ranks.values()) else "wall-clock step"
        extra = {"measure": measure, "steps": [steps[0], steps[-1]] if steps else []}
        return {
            node: dataclasses.replace(verdict, evidence=verdict.evidence | extra)
            for node, verdict in detect_stragglers(by_node, policy).items()
        }
