"""The memory tier: checkpoints in host shared memory, replicated to peer nodes, restored
before durable storage.

**Where the bytes live.** Each node owns a directory, ``/dev/shm/trainctl-<job>/<node>/``
(`node_memory_root`), so simulated nodes on one machine behave like separate hosts; the file
names and records are `trainctl.checkpoint.slot_layout`'s:

* ``slots/`` — per rank of the node, a layout (where each tensor lives) and
  ``checkpoint.memory.slots`` (2, or 1) fixed slot files the rank copies its state into,
  alternately, each with a record written after the copy and removed before the next. The
  kernel holds these pages, not the worker: a SIGKILLed worker loses nothing, and (two slots)
  the newest complete copy is never the one being written.
* ``slots/rank-R.slot-K.crc.json`` — per-entry CRC32s the node's holder computes for the step
  it is about to replicate (discarded when the record changed while it summed), or at a
  restore for a step never replicated.
* ``held/<peer>/slots/`` — replicas of ``<peer>``'s slots, as many per rank.
* ``slots/replicated.json`` — the holder's `Permit` to single-slot workers (below).
* ``restore/index.json`` — where every rank of the step to restore has its verified copy.

The node's **holder** (`trainctl.checkpoint.holder`, a thread of the node agent: it outlives
worker crashes and dies with the node) serves that directory to the other holders
(`trainctl.checkpoint.peer_wire`: token-authenticated). When the local scheduler loses a
simulated node it removes that node's directory, as the host's death would (on Slurm and Ray
the RAM really is gone).

**Replication.** In the background, paced to a bandwidth and to a duty cycle (`holder.DUTY`
of one core: after a round of T seconds of CPU it rests T x (1 - DUTY) / DUTY), each holder
sums and sends the newest step every local rank has recorded (`newest_replicable`:
intermediate steps are skipped, so the holder's CPU stays bounded) to its `replicas` ring
successors (`ring_peers`), into the held slot that does not hold their newest copy
(`replication_target`); the receiver writes the sender's CRCs and the record only after it has
every byte and the sender confirmed its slot unchanged (`trainctl.checkpoint.slot_wire`), so
the older held copy stays valid until the newer one is whole.

**Counts only when whole.** A step is restorable when every rank of the attempt that wrote it
has a copy of it (record and layout agreeing, checksums too for a replica) somewhere among the
surviving nodes.
Ranks advance in lockstep, so after a crash every rank still holds the oldest of the ranks'
newest steps in one of its two slots (with one slot, a crash mid-save leaves ranks at different
newest steps: the older step then comes from a replica, or durable storage restores). There is
no commit record to lose: the choice is made from the copies themselves (`restore_candidates`).

**Restore from the fastest valid tier.** Before a relaunch's workers start, each node's holder
picks the newest restorable step, each rank's copy best first (own slot here, own slot at a
surviving peer, then a replica), verifies the CRC of every entry of the copies it picks (a bad
copy is skipped with a reason, for the next one) and writes ``restore/index.json``; it copies
no data: the workers read local slots in place and remote ones by range, and DCP's planner
reshards, so a shrink or a spare restores from memory as from storage. The tier is ``memory``
when only own copies were used and ``peer`` when a replica was (`restore_tier_of`). When no
step is whole, no index is written and the workers restore from durable storage with a
``restore_skipped`` event. Resume after the controller died: the memory tier is dropped and
durable storage restores (the resume says so).

**Memory cost per node** (`memory_budget`): ``checkpoint.memory.slots`` (2 by default, at most
`SLOT_COUNT`) copies of each local rank's state and as many of each rank whose node it
replicates — ``slots x (1 + replicas) x`` the node's state, flat over time, nothing transient
(replicas are received in place into the held slot). Copies of an older attempt's ranks are
dropped once the new attempt's local ranks have a recorded step (`stale_ranks`), held copies
of nodes no longer in the attempt likewise (`held_nodes_to_drop`). A node without that room
turns the tier off at the first save with a message (the gate checks ``/dev/shm`` too).

**One slot per copy** (``slots: 1``). Every copy is rewritten in place (its record removed
first), so a copy is torn while it is rewritten. With replicas, a rank's own slot and its
replica are never torn at once: the holder publishes the step it last replicated to every ring
peer (``slots/replicated.json``, `Permit`), and a worker overwrites its slot only when that is
the step the slot holds (`may_overwrite`: one ``stat`` per save, the file re-read only when it
changed); otherwise it skips that memory save and keeps the older whole copy. A holder that
cannot replicate (no ring peer, `FREE_AFTER_FAILED_ROUNDS` failed rounds, or local ranks that
hold no common step after skipping apart) publishes a free permit, so saving never stops. A
worker's write and the holder's send of the same slot exclude each other (`lock_slot`: the
worker skips when the holder is sending; the holder waits out a write and re-reads the record),
so a replica is never received from torn bytes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from trainctl.checkpoint.layout import MEMORY_BASE, memory_root, node_memory_root
from trainctl.checkpoint.slot_layout import SLOT_COUNT, SlotRecord
from trainctl.events import RestoreSkipped

if TYPE_CHECKING:  # torch: the controller and the CLI import this module, workers run it
    from trainctl.checkpoint.checkpointer import Checkpointer

MEMORY_TIER = "memory"
"""A restore from the nodes' own copies (the nodes survived, workers died)."""
PEER_TIER = "peer"
"""A restore that used a peer's replica of a lost node's files."""
DURABLE_TIER = "durable"
OWN_SOURCE = "own"
REPLICA_SOURCE = "replica"

QUIET_EVENTS = frozenset({"checkpoint_committed", "gc_deleted"})
"""Memory-tier events not sent to the job store: one per step would flood it."""


def release_node_memory(job_id: str, node: str, base: str = MEMORY_BASE) -> bool:
    """Remove one node's memory tier (its host died, as far as the job is concerned)."""
    root = node_memory_root(job_id, node, base)
    if not os.path.isdir(root):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


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


SLOT_BUFFER_BYTES = 16 * 2**20
"""The fixed buffer beside the slots, per rank: layouts, records, checksums, the objects
entry's headroom and temporary names."""


def memory_budget(
    state_bytes: int,
    ranks_on_host: int,
    free_bytes: int,
    replicas: int = 0,
    slots: int = SLOT_COUNT,
) -> Budget:
    """Whether `free_bytes` of tmpfs hold `ranks_on_host` ranks' slots: `slots` slots of
    `state_bytes` each, own and `replicas` peers' copies, plus `SLOT_BUFFER_BYTES` per rank
    (pure: the caller measures)."""
    copies = 1 + replicas
    needed = (slots * copies * state_bytes + SLOT_BUFFER_BYTES) * ranks_on_host
    text = (
        f"({slots} slot{'' if slots == 1 else 's'} x {copies} cop{'y' if copies == 1 else 'ies'} x "
        f"{state_bytes / 2**20:.1f} MiB + {SLOT_BUFFER_BYTES / 2**20:.0f} MiB) x "
        f"{ranks_on_host} rank(s) = {needed / 2**20:.1f} MiB needed, "
        f"{free_bytes / 2**20:.1f} MiB free in {MEMORY_BASE}"
    )
    if needed > free_bytes:
        return Budget(
            False,
            f"memory tier off: {text}; enlarge {MEMORY_BASE}, lower checkpoint.memory.replicas "
            "or disable checkpoint.memory",
        )
    return Budget(True, text)


def host_scope(hostnames: list[str], replicas: int = 1) -> Budget:
    """Whether the tier covers the ranks' hosts (their hostnames in rank order); pure.

    It does on any number of hosts: each node's holder serves its shards to the others, so a
    restore assembles the whole step on every host. Without replicas a lost host's shards are
    gone, and such a restore comes from durable storage; the reason says so."""
    hosts = sorted(set(hostnames))
    where = f"{len(hosts)} hosts" if len(hosts) != 1 else hosts[0]
    if len(hosts) > 1 and replicas == 0:
        return Budget(
            True, f"ranks on {where} without replicas: after a host loss, durable storage restores"
        )
    return Budget(True, f"ranks on {where}, {replicas} replica(s) per node")


def ring_peers(
    nodes: Sequence[str], node: str, replicas: int, hosts: Mapping[str, str]
) -> list[str]:
    """The `replicas` nodes that hold copies of `node`'s files: its successors on the ring of
    `nodes` (the attempt's, in plan order), those on another host (`hosts`: node -> host)
    first, then same-host ones when there are not enough other hosts; fewer when the ring is
    smaller (pure)."""
    if node not in nodes or replicas <= 0:
        return []
    start = list(nodes).index(node)
    ring = [nodes[(start + offset) % len(nodes)] for offset in range(1, len(nodes))]
    mine = hosts.get(node)
    other = [peer for peer in ring if mine is None or hosts.get(peer) != mine]
    same = [peer for peer in ring if peer not in other]
    return (other + same)[:replicas]


def restore_tier_of(sources: Iterable[str]) -> str:
    """The tier a restore used, from where each object came (``own`` or ``replica``): ``peer``
    when any object came from a peer's replica, else ``memory`` (pure)."""
    return PEER_TIER if REPLICA_SOURCE in set(sources) else MEMORY_TIER


@dataclasses.dataclass(frozen=True)
class SlotCopy:
    """One copy of old rank `rank`'s slot holding `step` of `attempt` (of `world_size` ranks):
    the rank's own slot (``own``) or a replica (``replica``), on this node (`local`) or at
    `node`; `location` is what the holder reads it by (a path, or a path at the peer)."""

    rank: int
    attempt: int
    step: int
    world_size: int
    kind: str
    local: bool
    node: str
    location: str

    @property
    def preference(self) -> int:
        """Lower is better: own here, own at a surviving peer, a replica here, one at a peer."""
        return (0 if self.kind == OWN_SOURCE else 2) + (0 if self.local else 1)


@dataclasses.dataclass(frozen=True)
class RestoreCandidate:
    """A step every rank of `attempt` has a copy of; per old rank, its copies best first."""

    attempt: int
    step: int
    copies: tuple[tuple[SlotCopy, ...], ...]


def restore_candidates(copies: Iterable[SlotCopy]) -> tuple[list[RestoreCandidate], list[str]]:
    """The steps a restore may use, best first (newest attempt first, then newest step), and why
    each newer step that is not whole was passed over (pure). The caller verifies the copies
    and takes the first candidate whose every rank has one that verifies."""
    by_attempt: dict[int, list[SlotCopy]] = {}
    for copy in copies:
        by_attempt.setdefault(copy.attempt, []).append(copy)
    candidates: list[RestoreCandidate] = []
    passed: list[str] = []
    for attempt in sorted(by_attempt, reverse=True):
        found = by_attempt[attempt]
        world_size = max(copy.world_size for copy in found)
        for step in sorted({copy.step for copy in found}, reverse=True):
            ranks = [
                tuple(
                    sorted(
                        (c for c in found if c.step == step and c.rank == rank),
                        key=lambda c: (c.preference, c.node, c.location),
                    )
                )
                for rank in range(world_size)
            ]
            missing = [rank for rank, held in enumerate(ranks) if not held]
            if missing:
                passed.append(
                    f"memory step {step} (attempt {attempt}): no valid copy of rank(s) "
                    f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''} "
                    "on any reachable node"
                )
                continue
            candidates.append(RestoreCandidate(attempt, step, tuple(ranks)))
    return candidates, passed


def newest_replicable(
    checksummed: Mapping[int, Iterable[tuple[int, int]]],
) -> tuple[int, int] | None:
    """The newest (attempt, step) that every local rank (rank -> its checksummed (attempt,
    step) pairs) holds, or None: what a holder replicates next (pure)."""
    common: set[tuple[int, int]] | None = None
    for pairs in checksummed.values():
        common = set(pairs) if common is None else common & set(pairs)
    return max(common) if common else None


def replication_target(
    held: Mapping[int, SlotRecord | None], wanted: SlotRecord, slots: int = SLOT_COUNT
) -> int | None:
    """Which held slot (index -> its record, None: no record) receives `wanted`: None when one
    already holds it; else a slot without a record, else the one with the older copy, so the
    newest held copy stays valid while the new one is received (pure)."""
    records = {index: held.get(index) for index in range(slots)}
    if wanted in records.values():
        return None
    empty = [index for index, record in records.items() if record is None]
    if empty:
        return empty[0]
    return min(records, key=lambda index: _age(records[index]))


def _age(record: SlotRecord | None) -> tuple[int, int]:
    return (-1, -1) if record is None else (record.attempt, record.step)


FREE_AFTER_FAILED_ROUNDS = 3
"""Replication rounds in a row that failed to reach a ring peer before a holder frees its
single-slot workers (the peer is likely dead: the controller relaunches soon)."""


@dataclasses.dataclass(frozen=True)
class Permit:
    """``slots/replicated.json``: the (attempt, step) its holder last replicated to every ring
    peer (None: none since the attempt was configured), or `free`: no replica can complete now,
    overwrite at will."""

    replicated: tuple[int, int] | None
    free: bool

    def to_json(self) -> dict[str, Any]:
        pair = self.replicated
        return {"attempt": pair and pair[0], "step": pair and pair[1], "free": self.free}

    @classmethod
    def from_json(cls, value: Any) -> Permit | None:
        try:
            attempt, step = value["attempt"], value["step"]
            pair = None if attempt is None or step is None else (int(attempt), int(step))
            return cls(pair, bool(value["free"]))
        except (TypeError, KeyError, ValueError):
            return None


def permit_of(
    replicated: tuple[int, int] | None, has_targets: bool, failed_rounds: int, apart: bool
) -> Permit:
    """What a holder tells its single-slot workers (pure): free without a ring peer to send to,
    after `FREE_AFTER_FAILED_ROUNDS` failed rounds, or while its local ranks hold no common step
    (`apart`: they skipped apart, and nothing can be replicated until they meet again)."""
    free = not has_targets or failed_rounds >= FREE_AFTER_FAILED_ROUNDS or apart
    return Permit(replicated, free)


def may_overwrite(
    held: tuple[int, int] | None, permit: Permit | None, replicas: int, slots: int
) -> bool:
    """Whether a worker may rewrite its slot now, which holds `held` (attempt, step; None: no
    whole copy) (pure). Always with two slots (the other one stays whole) or without replicas
    (nothing to wait for) or without a holder's word (`permit` None: no holder replicates).
    With one slot and replicas: only when the holder replicated exactly that step or freed its
    workers; otherwise the save is skipped and the slot keeps its whole, older copy."""
    if slots >= 2 or replicas == 0 or held is None or permit is None or permit.free:
        return True
    return permit.replicated == held


def stale_ranks(attempts: Mapping[int, int], newest_ready: bool) -> list[int]:
    """Ranks (rank -> the attempt of its layout) whose files an older attempt left, to drop once
    the newest attempt has a checksummed step on every one of its ranks (`newest_ready`): until
    then a restore may still need them (pure)."""
    if not attempts or not newest_ready:
        return []
    newest = max(attempts.values())
    return sorted(rank for rank, attempt in attempts.items() if attempt < newest)


def held_nodes_to_drop(held: Iterable[str], sources: Iterable[str], ready: bool) -> list[str]:
    """Nodes whose replicas this holder keeps but that no longer send it theirs (`sources`:
    the attempt's nodes whose ring successors include this one): dropped once the attempt's
    local ranks have a checksummed step (`ready`); until then the attempt's restore may still
    need them (a lost node's replica is what it restores from) (pure)."""
    if not ready:
        return []
    return sorted(set(held) - set(sources))


def tier_order(memory_newest: int | None, durable_newest: int | None) -> list[str]:
    """The tiers to try, best first: memory when it holds a step at least as new as durable
    storage's newest (it is faster to read), else durable alone (pure)."""
    if memory_newest is None:
        return [DURABLE_TIER]
    if durable_newest is not None and durable_newest > memory_newest:
        return [DURABLE_TIER]
    return [MEMORY_TIER, DURABLE_TIER]


class TierRestorer(Protocol):
    """A tier `restore_tiers` can try before durable storage (the memory tier's
    `trainctl.checkpoint.slot_reader.SlotRestorer`)."""

    tier: str
    missing_reason: str
    """Why `newest_listed_step` found none (said in the ``restore_skipped`` event)."""

    def newest_listed_step(self) -> int | None: ...

    def restore_latest(self, state: Mapping[str, Any]) -> int | None: ...


def restore_tiers(
    memory: TierRestorer | None,
    durable: Checkpointer,
    state: Mapping[str, Any],
    emit: Callable[[str, dict[str, Any]], None],
) -> int | None:
    """Load the newest good step of the fastest tier into `state`; returns the step (None:
    nothing anywhere). A memory tier that fails (RestoreError: a copy failing its checksum, an
    unreachable peer, a load error) falls back to durable storage (which overwrites all of
    `state`) with a ``restore_skipped`` event saying why; raises RestoreError when that finds
    nothing either after the failed load wrote into `state`. Call on every rank."""
    from trainctl.checkpoint.restore import RestoreError  # torch: workers only

    if memory is None:  # no tier: exactly the durable restore (no extra listing)
        return durable.restore_latest(state)
    memory_newest = memory.newest_listed_step()
    order = tier_order(memory_newest, durable.newest_listed_step())
    if memory_newest is None:
        emit(
            RestoreSkipped.KIND,
            {"reason": f"{MEMORY_TIER} tier: {memory.missing_reason}", "tier": MEMORY_TIER},
        )
    touched = False
    if order[0] == MEMORY_TIER:
        try:
            step = memory.restore_latest(state)
        except RestoreError as error:
            touched = True
            emit(
                RestoreSkipped.KIND,
                {
                    "step": memory_newest,
                    "reason": f"{memory.tier} tier: {error}",
                    "tier": memory.tier,
                },
            )
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
