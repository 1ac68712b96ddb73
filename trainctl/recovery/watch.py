"""What the controller remembers about progress, fed to the pure detectors in health.progress.

`ProgressWatch` keeps, per rank, the last step, when the controller saw it advance, and the
recent per-step times the agents forward; it asks `derive_hang_timeout`, `detect_hang` and
`detect_stragglers` for decisions. It reads no clock: every call takes `now` (the controller's
monotonic clock, so worker clock skew across hosts cannot fake or hide a hang).

Per-step sample: the rank's *busy* time when the script marks it (`ctx.busy()`), else its
wall-clock step time. Straggler detection compares nodes (the slowest rank of each node per
step) over the most recent steps that every rank has reported. The per-node series are kept as
samples arrive (O(1) a sample: per node and step, the slowest rank so far and how many ranks
reported it), so a check reads N nodes' windows instead of rebuilding them from 8 N ranks.
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
        self._node_steps: dict[str, dict[int, list[float]]] = {}
        """node -> step -> [slowest sample of its ranks so far, how many ranks reported it]."""
        self._node_ranks: dict[str, int] = {}
        """node -> how many of its ranks have reported a sample."""

    # -- feeding ---------------------------------------------------------------------------
    def node_started(self, node: str, now: float) -> None:
        self.started.setdefault(node, now)

    def node_exited(self, node: str) -> None:
        self.exited.add(node)

    def record(self, node: str, ranks: Mapping[str, Heartbeat], now: float) -> None:
        """Fold one progress report from `node`'s agent (rank -> latest heartbeat)."""
        # Every progress line of every node comes through here (512 a second at 1,024 nodes):
        # nothing is built that is not kept.
        step_times, keep = self.step_times, 2 * self.health.straggler_window
        for raw_rank, beat in ranks.items():
            rank = int(raw_rank)
            progress = self.ranks.get(rank)
            if progress is None:
                progress = self.ranks[rank] = RankProgress(node=node)
            progress.saving = beat.saving and beat.step >= progress.step
            if beat.step > progress.step:
                progress.step = beat.step
                progress.last_progress_at = now
            samples = beat.samples or ((beat.step, beat.step_time, beat.busy_time),)
            for sample_step, step_time, busy_time in samples:
                if step_time is not None:
                    step_times.append(float(step_time))
                value = busy_time if busy_time is not None else step_time
                if value is not None:
                    self._sample(progress, int(sample_step), float(value), keep)
                    if busy_time is not None:
                        progress.reports_busy = True
                    self._new_samples = True

    def _sample(self, progress: RankProgress, step: int, value: float, keep: int) -> None:
        """Keep one rank's sample and fold it into its node's series for that step (`keep`:
        the steps kept, twice the straggler window)."""
        node = progress.node
        if not progress.samples:
            self._node_ranks[node] = self._node_ranks.get(node, 0) + 1
        steps = self._node_steps.get(node)
        if steps is None:
            steps = self._node_steps[node] = {}
        entry = steps.get(step)
        if entry is None:
            entry = steps[step] = [value, 0.0]
        elif value > entry[0]:
            entry[0] = value
        if step not in progress.samples:
            entry[1] += 1
        progress.samples[step] = value
        # Pruned in batches (sorting 2 x window steps once per window, not on every sample).
        if len(progress.samples) > 2 * keep:
            for old in sorted(progress.samples)[:-keep]:
                del progress.samples[old]
        if len(steps) > 2 * keep:
            for old in sorted(steps)[:-keep]:
                del steps[old]

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
        steady, saving = self.steady_timeout(), self.saving_timeout()
        # Every rank advanced within the shorter timeout (the common case, 8,192 ranks at
        # 1,024 nodes every second): none of them can be hung, nothing more to sort out.
        oldest = min((p.last_progress_at for p in self.ranks.values()), default=now)
        if now - oldest > min(steady.timeout_s, saving.timeout_s):
            watched = self._watched()
            hung = detect_hang(
                now,
                {rank: p.last_progress_at for rank, p in watched.items() if not p.saving},
                steady.timeout_s,
            )
            if hung:
                return HangCheck(hung, steady)
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

    def _complete_steps(self, nodes: dict[str, int], window: int) -> list[int]:
        """The newest `window` steps that every rank of every node in `nodes` (node -> its
        ranks) reported, oldest first: the first node's complete steps, newest first, each
        kept while every node has it complete (a node's series is no longer turned into a set
        of every step it holds, 1,024 sets a check)."""
        node_steps = self._node_steps
        first, first_ranks = next(iter(nodes.items()))
        candidates = sorted(
            (step for step, (_, count) in node_steps[first].items() if count >= first_ranks),
            reverse=True,
        )
        steps: list[int] = []
        for step in candidates:
            if all(
                (entry := node_steps[node].get(step)) is not None and entry[1] >= ranks
                for node, ranks in nodes.items()
            ):
                steps.append(step)
                if len(steps) == window:
                    break
        return steps[::-1]

    def check_stragglers(self) -> dict[str, HealthVerdict]:
        """A verdict per node over the most recent steps every rank has reported."""
        self._new_samples = False
        nodes = {node: n for node, n in self._node_ranks.items() if n}
        if len(nodes) < 2:
            return {}
        steps = self._complete_steps(nodes, self.health.straggler_window)
        by_node = {node: [self._node_steps[node][step][0] for step in steps] for node in nodes}
        policy = StragglerPolicy(
            factor=self.health.straggler_factor, window=self.health.straggler_window
        )
        busy = all(p.reports_busy for p in self.ranks.values() if p.samples)
        measure = "busy" if busy else "wall-clock step"
        extra = {"measure": measure, "steps": [steps[0], steps[-1]] if steps else []}
        return {
            node: dataclasses.replace(verdict, evidence=verdict.evidence | extra)
            for node, verdict in detect_stragglers(by_node, policy).items()
        }
