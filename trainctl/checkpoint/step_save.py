"""One step's save on every rank: DCP's SPMD save protocol with trainctl's commit folded in.

``dcp.save`` costs three collective rounds per save (plans gathered to rank 0 and scattered
back, even when its plan cache says nothing changed; write results gathered; the metadata
broadcast back), and the commit around it cost three more (rank 0 clears the step directory,
every rank's object records are gathered, the commit is broadcast). On a 100 MB state on local
disk those rounds and the waits between them were a third of the durable time (~20 ms of ~60).

`save_step` drives the same public planner and storage-writer calls as ``dcp.save`` (so the
shard files and ``.metadata`` are exactly DCP's, and plain ``dcp.load`` reads them) with:

1. one ``all_reduce`` of four integers: did any rank fail to set up, did any rank's plan
   change (DCP's plan cache decides), did rank 0 find the step committed, or holding objects
   of an earlier failed save (then rank 0 clears it, between two barriers, before anyone
   writes). Plans travel (gather, global plan on rank 0, scatter) only when one changed; a
   training job saves the same layout every time, so that is the first save. A rank whose
   plan is the cached one starts writing while the all_reduce is in flight and publishes
   nothing (a storage writer's close renames or completes the object) until it says every
   rank may: on a host with a core per rank the all_reduce, started under the staging
   copies, completed 1-10 ms after them. When it says no, what was written is discarded.
2. every rank writes its shards;
3. one gather of (write results, object records, error) to rank 0, which writes ``.metadata``
   and then the manifest (the commit); one broadcast of the outcome.

A rank that fails a step still joins every later collective and says why, as DCP's
``_DistWrapper`` does, so a failure on one rank fails the save on all of them instead of leaving
the others blocked in a collective.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from trainctl.checkpoint.collectives import GATHER_CAPACITY, Collectives
from trainctl.checkpoint.dcp_io import CachingSavePlanner, StorageWriter
from trainctl.checkpoint.manifest import Manifest, ObjectRecord

PREPARED = "ok"
"""`prepare`'s answer when the step directory is ready to write into."""
ALREADY_COMMITTED = "committed"
"""`prepare`'s answer when the step is committed already (it is never overwritten)."""
LEFTOVER = "leftover"
"""`prepare`'s answer when the step directory holds objects of an earlier, failed save."""

_FAILED, _REPLAN, _COMMITTED, _LEFTOVER = range(4)  # the agreement's fields


class SaveFailed(RuntimeError):
    """The save failed on at least one rank; raised on every rank, with every rank's reason."""


@dataclass(frozen=True)
class StepSaved:
    """How `save_step` ended on this rank (failures raise `SaveFailed`)."""

    committed: bool
    """False: the step was committed already, nothing was written."""
    size_bytes: int = 0
    """Bytes of every object of the step, all ranks (0 when not committed)."""
    upload_s: float = 0.0
    """This rank's write time."""


@dataclass
class _Written:
    """What a rank sends rank 0 after writing."""

    results: list[WriteResult] = field(default_factory=list)
    records: list[ObjectRecord] = field(default_factory=list)
    upload_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class _PlanFailed:
    """Scattered instead of a plan when planning failed on some rank."""

    reason: str


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _reasons(comm: Collectives, error: str | None) -> str:
    """Every rank's error, on every rank (a collective: call it on every rank)."""
    errors = comm.all_gather(error)
    return "; ".join(f"rank {rank}: {why}" for rank, why in enumerate(errors) if why)


def save_step(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    planner: CachingSavePlanner,
    comm: Collectives,
    *,
    prepare: Callable[[], str],
    clear: Callable[[], str],
    records_of: Callable[[], list[ObjectRecord]],
    commit: Callable[[list[ObjectRecord], float, float], Manifest | str],
    early: EarlyMetadata | None = None,
    plan_known: bool = False,
) -> StepSaved:
    """Write `state_dict` (staged, plain: no `Stateful`s) through `writer` and commit it.

    Call on every rank. On rank 0, `prepare()` looks at the step directory first (and changes
    nothing: other ranks may be writing into it already) and answers `PREPARED`,
    `ALREADY_COMMITTED`, `LEFTOVER` or why it failed; `clear()` deletes a leftover (answers
    `PREPARED` or why it failed) once every rank stopped writing; `commit(records, upload_s,
    committing)` writes the manifest for every rank's object records (`upload_s`: the slowest
    rank's write time; `committing`: when rank 0 started gathering) and returns it, or why it
    failed. `records_of()` lists what this rank's writer wrote (rank 0: after ``.metadata``).
    `early` (rank 0) writes ``.metadata`` ahead when it can. `plan_known`: the state has the
    layout of this planner's last committed save (DCP's cached plan holds). Raises `SaveFailed`
    on every rank when any rank failed.
    """
    coordinator = comm.rank == 0
    error: str | None = None
    local_plan: SavePlan | None = None
    try:
        planner.set_up_planner(
            state_dict=state_dict, storage_meta=writer.storage_meta(), is_coordinator=coordinator
        )
        writer.set_up_storage_writer(coordinator, rank=comm.rank, use_collectives=True)
        # DCP builds the local plan item by item and compares it with its cached one: 1 ms for
        # 30 tensors, tens of ms for a large model, on a thread that shares the GIL with
        # training. A caller that knows the layout is the one last planned skips both.
        known = plan_known and planner.has_final_plan()
        local_plan = SavePlan([], usable=False) if known else planner.create_local_plan()
    except Exception as failure:
        error = _describe(failure)
    # An unchanged plan comes back empty and unusable from DCP's cache (`CachingSavePlanner`).
    replan = local_plan is None or local_plan.usable or not planner.has_final_plan()
    speculate = error is None and not replan
    if speculate:
        try:
            writer.file_system.mkdir(writer.path)
        except Exception as failure:
            error = _describe(failure)
    committed_already = leftover = False
    if coordinator and error is None:
        answer = prepare()
        committed_already = answer == ALREADY_COMMITTED
        leftover = answer == LEFTOVER
        if answer not in (PREPARED, ALREADY_COMMITTED, LEFTOVER):
            error = f"preparing {writer.path}: {answer}"
    flags = [int(error is not None), int(replan), int(committed_already), int(leftover)]
    mine = None if coordinator else records_of  # rank 0 lists its objects after .metadata

    metadata: Metadata | None = None
    ahead: Future[None] | None = None
    written = _Written()
    if speculate and error is None:
        # This rank's plan is the cached one: write now, while the agreement is in flight
        # (under the staging copies it completes late on a host with a core per rank), and
        # publish nothing before it says every rank may (`publish_gate`).
        agreement = _Agreement(comm.max_ints_async(flags))
        writer.file_system.publish_gate = agreement.require_clear
        try:
            if coordinator:
                metadata = _cached_metadata(planner, comm.world_size)
                if early is not None:
                    ahead = early.start(writer, metadata)
            written = _write(writer, planner, SavePlan([], usable=False), mine)
        finally:
            agreed = agreement.result()
            if any(agreed) and ahead is not None:
                ahead.exception()  # abandoned at the gate: gone before the gate is lifted
                ahead = None
            writer.file_system.publish_gate = None
    else:
        agreed = comm.max_ints(flags)

    if any(agreed):  # not every rank could go ahead: anything written was abandoned
        if agreed[_FAILED]:
            raise SaveFailed(_reasons(comm, error))
        if agreed[_COMMITTED]:
            return StepSaved(committed=False)
        if agreed[_LEFTOVER]:
            comm.max_ints([0])  # every rank is past its abandoned writes
            why = clear() if coordinator else PREPARED
            if comm.max_ints([int(why != PREPARED)])[0]:
                raise SaveFailed(_reasons(comm, None if why == PREPARED else why))
        assert local_plan is not None
        try:  # rank 0 has cleared the step directory
            local_plan = writer.prepare_local_plan(local_plan)  # mkdir; refuses a .metadata
        except Exception as failure:
            error = _describe(failure)
        if agreed[_REPLAN]:
            central_plan, metadata, error = _plan_together(writer, planner, comm, local_plan, error)
        else:
            central_plan = SavePlan([], usable=False)  # finish_plan takes the cached final plan
            if coordinator:
                metadata = _cached_metadata(planner, comm.world_size)
        if early is not None and error is None and not agreed[_REPLAN] and metadata is not None:
            ahead = early.start(writer, metadata)
        if error is None:
            written = _write(writer, planner, central_plan, mine)
        else:
            written = _Written(error=error)

    committing = time.perf_counter()
    gathered: list[_Written] = comm.gather(written)
    verdict: Manifest | str = ""
    if coordinator:
        verdict = _finish(writer, metadata, gathered, records_of, commit, early, ahead, committing)
    # With the outcome: the next gather's slot, sized to what this one received (every rank
    # must use the same size, and every rank gets this broadcast).
    slot = max(GATHER_CAPACITY, -(-comm.largest_gathered // 4096) * 4096)
    if isinstance(verdict, Manifest):
        ended = comm.broadcast_ints([1, verdict.size_bytes, slot])
    else:
        ended = comm.broadcast_ints([0, 0, slot])
    comm.gather_capacity = ended[2]
    if not ended[0]:
        raise SaveFailed(comm.broadcast(verdict))
    return StepSaved(committed=True, size_bytes=ended[1], upload_s=written.upload_s)


def _cached_metadata(planner: CachingSavePlanner, world_size: int) -> Metadata:
    """Rank 0, every plan unchanged: the global metadata, from DCP's plan cache."""
    _, metadata = planner.create_global_plan([SavePlan([], usable=False)] * world_size)
    return metadata


def _write(
    writer: StorageWriter,
    planner: CachingSavePlanner,
    central_plan: SavePlan,
    records_of: Callable[[], list[ObjectRecord]] | None,
) -> _Written:
    """This rank's shards (and its object records, from `records_of` when given); failures
    are returned (rank 0 hears of them), never raised."""
    written = _Written()
    started = time.perf_counter()
    try:
        final_plan = planner.finish_plan(central_plan)
        results = writer.write_data(final_plan, planner)
        results.wait()
        written.results = results.value()
        if records_of is not None:
            written.records = records_of()
    except Exception as failure:
        written.error = _describe(failure)
    written.upload_s = time.perf_counter() - started
    return written


class _Abandoned(Exception):
    """Raised at the publish gate: the ranks did not all agree to go ahead."""


class _Agreement:
    """The agreement's outcome, awaited once by whichever thread needs it first."""

    def __init__(self, outcome: Callable[[], list[int]]) -> None:
        self._outcome = outcome
        self._lock = threading.Lock()
        self._agreed: list[int] | None = None

    def result(self) -> list[int]:
        with self._lock:
            if self._agreed is None:
                self._agreed = self._outcome()
            return self._agreed

    def require_clear(self) -> None:
        if any(self.result()):
            raise _Abandoned("another rank could not go ahead with this save")


def _layout_of(results: list[list[WriteResult]]) -> dict[Any, Any]:
    """Where every item went: what ``.metadata`` records of a save's write results."""
    return {result.index: result.storage_data for rank in results for result in rank}


class EarlyMetadata:
    """Rank 0: writes a save's ``.metadata`` while its shards are still being written.

    ``.metadata`` records where every item went (file, offset, length), which DCP only knows
    from the write results, so it is written after every rank finished: ~1.5 ms locally, a PUT
    on S3, between the last shard and the manifest. A job saves the same layout every time,
    so the previous save's results predict this one's: `start` writes ``.metadata`` from them
    in the background, `settle` compares them with the real results and rewrites it when they
    differ (a serialised object changed size). Nothing is trusted before the manifest, which
    is written after `settle`.
    """

    def __init__(self) -> None:
        self._last: list[list[WriteResult]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.hits = 0
        """Saves whose early ``.metadata`` was right (kept)."""

    def start(self, writer: StorageWriter, metadata: Metadata) -> Future[None] | None:
        """Write ``.metadata`` from the last save's results, in the background (None: no
        earlier save to go by)."""
        if self._last is None:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="trainctl-ckpt-metadata")
        return self._executor.submit(writer.finish, metadata=metadata, results=self._last)

    def settle(
        self,
        writer: StorageWriter,
        metadata: Metadata,
        ahead: Future[None] | None,
        results: list[list[WriteResult]],
    ) -> None:
        """Make ``.metadata`` match `results`: keep the early one if it does, else rewrite."""
        right = (
            ahead is not None
            and ahead.exception() is None  # waits for it: a rewrite must not race it
            and self._last is not None
            and _layout_of(self._last) == _layout_of(results)
        )
        self._last = None
        if right:
            self.hits += 1
        else:
            writer.finish(metadata=metadata, results=results)
        self._last = results

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _plan_together(
    writer: StorageWriter,
    planner: CachingSavePlanner,
    comm: Collectives,
    local_plan: SavePlan,
    error: str | None,
) -> tuple[SavePlan, Metadata | None, str | None]:
    """DCP's planning round: plans to rank 0, global plan there, each rank's plan back."""
    plans = comm.gather(local_plan if error is None else _PlanFailed(error))
    central: list[Any] | None = None
    metadata: Metadata | None = None
    if comm.rank == 0:
        failed = [
            f"rank {rank}: {plan.reason}"
            for rank, plan in enumerate(plans)
            if isinstance(plan, _PlanFailed)
        ]
        if failed:
            central = [_PlanFailed("; ".join(failed))] * comm.world_size
        else:
            try:
                deltas, metadata = planner.create_global_plan(plans)
                central = writer.prepare_global_plan(deltas)
            except Exception as failure:
                central = [_PlanFailed(f"rank 0: {_describe(failure)}")] * comm.world_size
    mine = comm.scatter(central)
    if isinstance(mine, _PlanFailed):
        return SavePlan([]), None, error or mine.reason
    return mine, metadata, error


def _finish(
    writer: StorageWriter,
    metadata: Metadata | None,
    gathered: list[_Written],
    records_of: Callable[[], list[ObjectRecord]],
    commit: Callable[[list[ObjectRecord], float, float], Manifest | str],
    early: EarlyMetadata | None,
    ahead: Future[None] | None,
    committing: float,
) -> Manifest | str:
    """Rank 0: ``.metadata``, then the manifest (the commit). Returns it, or why not."""
    failed = [f"rank {rank}: {w.error}" for rank, w in enumerate(gathered) if w.error]
    if failed:
        if ahead is not None:
            ahead.exception()  # let it finish; the step is garbage either way
        return "; ".join(failed)
    try:
        assert metadata is not None, "rank 0 planned this save"
        results = [w.results for w in gathered]
        if early is not None:
            early.settle(writer, metadata, ahead, results)
        else:
            writer.finish(metadata=metadata, results=results)
        records = records_of() + [record for w in gathered[1:] for record in w.records]
    except Exception as failure:
        return f"rank 0: {_describe(failure)}"
    return commit(records, max(w.upload_s for w in gathered), committing)


__all__ = [
    "ALREADY_COMMITTED",
    "LEFTOVER",
    "PREPARED",
    "EarlyMetadata",
    "SaveFailed",
    "StepSaved",
    "save_step",
]
