"""The process group's collective timeout, derived from the job's own step times.

torch's default is 10 minutes (NCCL; 30 for gloo): a collective whose peer died or hung blocks
for that long before NCCL's watchdog aborts it. trainctl's controller detects a hang much
sooner (`health.hang_*`: max(floor, k x p99 step time)), dumps stacks and the flight recorder,
blames and relaunches; the collective timeout is the backstop behind it — what ends a wedged
rank and leaves NCCL's own flight-recorder dump when nobody else can (a controller cut off by a
partition, a node agent that died) — so it is set well past the point where trainctl acts
(a collective that fails first would make the healthy ranks' exits look like the failure,
and the stuck rank would go unblamed):

    timeout = 2 x (hang timeout + stack_dump_timeout_s)
            + checkpoint_allowance_s when the job checkpoints (a peer may wait for a save's
              back-pressure before it enters the next collective)

where the hang timeout is the pinned ``hang_timeout_s``, or max(hang_floor_s, hang_k x p99
of this rank's step times over hang_window steps) — trainctl's own hang timeout, and
``stack_dump_timeout_s`` its stack and flight-recorder collection; the factor 2 covers the
rest of its reaction (progress batching, the decision, the kill) and the difference between
this rank's step times and the whole job's. With the defaults: 150 s, 450 s with checkpoints.

Until `WARMUP_STEPS` steps are timed, the group keeps the timeout it started with,
``first_step_allowance_s`` + 2 x ``stack_dump_timeout_s`` + `FIRST_STEP_MARGIN_S` (building
NCCL communicators and the first step are slow at scale; trainctl acts at the allowance).
It is re-applied only when the derived value moves by more than `CHANGE` (so a noisy step does
not call into the process group every step).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable

from trainctl.spec import HealthSpec

WARMUP_STEPS = 10
"""Step times needed before the timeout is derived (the first steps compile and warm up)."""
CHANGE = 0.2
"""Re-apply when the derived timeout moved by more than this fraction."""
FIRST_STEP_MARGIN_S = 60.0
"""Past trainctl's own first-step hang timeout, before the group gives up by itself."""


def p99(values: collections.deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclasses.dataclass
class CollectiveTimeout:
    """Feeds on step times; calls `apply(seconds)` when the derived timeout changes."""

    health: HealthSpec
    checkpointing: bool
    apply: Callable[[float], None]
    current_s: float = 0.0
    _times: collections.deque[float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._times = collections.deque(maxlen=max(self.health.hang_window, WARMUP_STEPS))
        if not self.current_s:
            self.current_s = self.initial_s(self.health)

    @staticmethod
    def initial_s(health: HealthSpec) -> float:
        """The timeout the process group starts with (communicator set-up, first steps)."""
        first = max(health.first_step_allowance_s, health.hang_timeout_s or 0.0)
        return first + 2 * health.stack_dump_timeout_s + FIRST_STEP_MARGIN_S

    def derive(self) -> float | None:
        """The timeout the step times so far call for (None: too few yet)."""
        if len(self._times) < WARMUP_STEPS:
            return None
        health = self.health
        hang = health.hang_timeout_s or max(health.hang_floor_s, health.hang_k * p99(self._times))
        allowance = health.checkpoint_allowance_s if self.checkpointing else 0.0
        return 2 * (hang + health.stack_dump_timeout_s) + allowance

    def observe(self, step_time: float | None) -> float | None:
        """Take one step's time; returns the new timeout when it was applied."""
        if step_time is None or step_time < 0:
            return None
        self._times.append(step_time)
        target = self.derive()
        if target is None or abs(target - self.current_s) <= CHANGE * self.current_s:
            return None
        self.apply(target)
        self.current_s = target
        return target
