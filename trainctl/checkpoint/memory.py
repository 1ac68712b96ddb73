"""The memory tier: checkpoints in host shared memory, replicated to peer nodes, restored
before durable storage.

**Where the bytes live.** Each node owns a directory, ``/dev/shm/trainctl-<job>/<node>/``
(`node_memory_root`), so simulated nodes on one machine behave like separate hosts:

* ``own/step-N/`` — what this node's ranks wrote (a second `Checkpointer` over tmpfs, every
  ``checkpoint.memory.interval_steps``); rank 0's node also holds ``.metadata`` and the
  manifest. The kernel holds these pages, not the worker: a SIGKILLed worker loses nothing.
* ``held/<peer>/step-N/`` — replicas of ``<peer>``'s files, received over TCP.
* ``acks/step-N/<node>`` and ``commit/step-N`` — the replication's two-phase commit.
* ``restore/step-N/`` — the whole step assembled for the next attempt's restore.

The node's **holder** (`trainctl.checkpoint.holder`, a thread of the node agent: it outlives
worker crashes and dies with the node) serves that directory to the other holders
(`trainctl.checkpoint.peer_wire`: token-authenticated, paced to a bandwidth, in the background:
a durable save never waits for it). When the local scheduler loses a simulated node it removes
that node's directory, as the host's death would (on Slurm and Ray the RAM really is gone).

**Counts only when whole.** A memory step is committed when (1) rank 0 wrote its manifest —
every rank's shard written with its checksum, as for a durable step — (2) every node's holder
sent its files to its `replicas` ring successors (`ring_peers`), each copy checked against the
checksum as received, and said so to every holder (``acks/step-N/<node>``), and (3) a holder
saw every node's ack (`acks_complete`) and wrote ``commit/step-N``. A step short of that is
never restored.

**Restore from the fastest valid tier.** Before a relaunch's workers start, each node's holder
assembles the newest committed step (`choose_restore_step`, asking the reachable peers too) into
``restore/``: for every object of the manifest it takes a node's own copy (local first, then a
surviving peer's), else a replica (``held/``), each verified against the manifest's checksum; a
bad or missing copy is skipped with a reason. The restore's tier is ``memory`` when only own
copies were used and ``peer`` when a replica was (`restore_tier_of`). The workers then restore
from ``restore/`` through DCP, so a shrink or a spare reshards from memory as from storage, every
block verified again while read. When no step can be assembled, or DCP's load fails, the
restore falls back to durable storage with a ``restore_skipped`` event naming the tier.
Resume after the controller died: the memory tier is dropped and durable storage restores (the
resume says so).

**Memory cost per node** (`memory_budget`): own copies of at most `STEPS_HELD` steps of the
node's ranks' state, plus `replicas` times that for the peers it holds, plus — transiently,
during and after a restore until the next step commits — one whole step of the job in
``restore/`` and one staging copy per rank in the worker. The holder keeps the two newest
committed steps and the one being written; it is not (1 + replicas) x state: it is
``STEPS_HELD x (1 + replicas) x`` the node's state. A node without that room turns the tier off
at the first save with a message (the gate checks ``/dev/shm`` too).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from trainctl.checkpoint.layout import MEMORY_BASE, memory_root, node_memory_root
from trainctl.checkpoint.slot_layout import SLOT_COUNT
from trainctl.events import RestoreSkipped

if TYPE_CHECKING:  # torch: the controller and the CLI import this module, workers run it
    from trainctl.checkpoint.checkpointer import Checkpointer

STEPS_HELD = 4
"""Steps of the state a node holds at most, per copy: two committed, one being replicated and
one being written (`steps_to_drop`)."""
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
    state_bytes: int, ranks_on_host: int, free_bytes: int, replicas: int = 0
) -> Budget:
    """Whether `free_bytes` of tmpfs hold `ranks_on_host` ranks' slots: `SLOT_COUNT` slots of
    `state_bytes` each, own and `replicas` peers' copies, plus `SLOT_BUFFER_BYTES` per rank
    (pure: the caller measures)."""
    copies = 1 + replicas
    needed = (SLOT_COUNT * copies * state_bytes + SLOT_BUFFER_BYTES) * ranks_on_host
    text = (
        f"({SLOT_COUNT} slots x {copies} cop{'y' if copies == 1 else 'ies'} x "
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


def acks_complete(acked: Iterable[str], nodes: Iterable[str]) -> tuple[bool, str]:
    """Whether every node of the attempt said its files are replicated, and who is missing."""
    missing = sorted(set(nodes) - set(acked))
    if missing:
        return False, f"waiting for {', '.join(missing)}"
    return True, "every node's files are replicated"


def restore_tier_of(sources: Iterable[str]) -> str:
    """The tier a restore used, from where each object came (``own`` or ``replica``): ``peer``
    when any object came from a peer's replica, else ``memory`` (pure)."""
    return PEER_TIER if REPLICA_SOURCE in set(sources) else MEMORY_TIER


def steps_to_drop(
    committed: Iterable[int], present: Iterable[int], keep: int = 2, pending: int = 2
) -> list[int]:
    """Steps a holder deletes (pure): all but the `keep` newest committed ones and the
    `pending` newest newer ones (one being replicated, one being written)."""
    newest = sorted(set(committed), reverse=True)[:keep]
    newer = sorted((s for s in set(present) if not newest or s > newest[0]), reverse=True)
    kept = set(newest) | set(newer[:pending])
    return sorted(set(present) - kept)


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
