"""The memory tier: checkpoints in host shared memory, restored before durable storage.

Every ``checkpoint.memory.interval_steps`` each rank's shard goes, through the same
`Checkpointer` as the durable tier (stage into reused buffers, then a background thread on its
own gloo group), into a tmpfs directory, ``/dev/shm/trainctl-<job id>``. The kernel holds those
pages, not the worker: a worker that crashes or is SIGKILLed loses nothing there, and its
relaunched successor reads them back. The controller owns the directory's life: it removes it
when the job ends, and before a resume (a dead controller's memory tier is not trusted; the
resume restores from durable storage and says so).

A memory step counts only when committed the way a durable one is: every rank's shard written
with its checksum, then one manifest written last (two-phase commit). Two committed steps are
kept, so the newest complete step is never overwritten while the next is written. Restore picks
the newest tier: memory first when its newest step is at least the durable one, every block
verified as it is read; a step that fails falls back (with a ``restore_skipped`` event naming
the tier) to the memory tier's older step, then to durable storage. DCP reads it, so a restore
onto a different world size reshards as from storage.

Memory cost per host: at most three steps of the state in tmpfs (two committed, one being
written) plus one staging copy per rank in the worker; `memory_budget` refuses the tier, with
a message, when the tmpfs has no room for that.

Scope: one host (simulated nodes included). On several hosts each rank's shard would stay on its
own host's tmpfs, where rank 0 cannot verify it: the tier turns itself off at its first save
(`host_scope`, with an event) and restores come from durable storage. Replication to peer hosts
is not built yet.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from trainctl.checkpoint.layout import MEMORY_BASE, memory_root
from trainctl.events import RestoreSkipped

if TYPE_CHECKING:  # torch: the controller and the CLI import this module, workers run it
    from trainctl.checkpoint.checkpointer import Checkpointer

STEPS_HELD = 3
"""Steps of the state a memory tier holds at most: two committed and one being written."""
MEMORY_TIER = "memory"
DURABLE_TIER = "durable"

QUIET_EVENTS = frozenset({"checkpoint_committed", "gc_deleted"})
"""Memory-tier events not sent to the job store: one per step would flood it."""


def release_memory(job_id: str, base: str = MEMORY_BASE) -> bool:
    """Remove the job's memory tier on this host; returns whether there was one."""
    root = memory_root(job_id, base)
    if not os.path.isdir(root):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


@dataclasses.dataclass(frozen=True)
class Budget:
    """Whether a memory tier fits, and why (or why not)."""

    fits: bool
    reason: str


def memory_budget(state_bytes: int, ranks_on_host: int, free_bytes: int) -> Budget:
    """Whether `free_bytes` of tmpfs hold `STEPS_HELD` steps of `ranks_on_host` shards of
    `state_bytes` each (pure: the caller measures)."""
    needed = STEPS_HELD * state_bytes * ranks_on_host
    text = (
        f"{STEPS_HELD} steps x {ranks_on_host} rank(s) x {state_bytes / 2**20:.1f} MiB = "
        f"{needed / 2**20:.1f} MiB needed, {free_bytes / 2**20:.1f} MiB free in {MEMORY_BASE}"
    )
    if needed > free_bytes:
        return Budget(
            False, f"memory tier off: {text}; enlarge {MEMORY_BASE} or disable checkpoint.memory"
        )
    return Budget(True, text)


def host_scope(hostnames: list[str]) -> Budget:
    """Whether the ranks (their hosts in rank order) share one host, as the tier needs until
    replication to peers exists (pure)."""
    hosts = sorted(set(hostnames))
    if len(hosts) > 1:
        return Budget(
            False,
            f"memory tier off: the ranks run on {len(hosts)} hosts ({', '.join(hosts[:4])}"
            f"{', ...' if len(hosts) > 4 else ''}) and it keeps shards on their own host only "
            "(replication to peers is not built): restores come from durable storage",
        )
    return Budget(True, f"all ranks on {hosts[0] if hosts else 'this host'}")


def tier_order(memory_newest: int | None, durable_newest: int | None) -> list[str]:
    """The tiers to try, best first: memory when it holds a step at least as new as durable
    storage's newest (it is faster to read), else durable alone (pure)."""
    if memory_newest is None:
        return [DURABLE_TIER]
    if durable_newest is not None and durable_newest > memory_newest:
        return [DURABLE_TIER]
    return [MEMORY_TIER, DURABLE_TIER]


def restore_tiers(
    memory: Checkpointer | None,
    durable: Checkpointer,
    state: Mapping[str, Any],
    emit: Callable[[str, dict[str, Any]], None],
) -> int | None:
    """Load the newest good step of the fastest tier into `state`; returns the step (None:
    nothing anywhere). A memory tier that fails every step falls back to durable storage
    (which overwrites all of `state`); raises RestoreError when that finds nothing either
    after a failed load wrote into `state`. Call on every rank."""
    from trainctl.checkpoint.restore import RestoreError  # torch: workers only

    if memory is None:  # no tier: exactly the durable restore (no extra listing)
        return durable.restore_latest(state)
    memory_newest = memory.newest_listed_step()
    order = tier_order(memory_newest, durable.newest_listed_step())
    if memory_newest is None:
        emit(RestoreSkipped.KIND, {"reason": f"{MEMORY_TIER} tier: no committed step in memory"})
    touched = False
    if order[0] == MEMORY_TIER:
        try:
            step = memory.restore_latest(state)
        except RestoreError as error:
            touched = True
            emit(RestoreSkipped.KIND, {"reason": f"{MEMORY_TIER} tier: {error}"})
        else:
            if step is not None:
                return step
    step = durable.restore_latest(state)
    if step is None and touched:
        raise RestoreError(
            "the memory tier failed part-way and durable storage holds no checkpoint: "
            "refusing to continue from a partly overwritten state"
        )
    return step
