"""Real DCP round trips through the Checkpointer: 2 gloo ranks with FSDP2 on CPU, resharding,
corruption fallback, uncommitted steps, plain-DCP interop.

The multi-rank scenarios are expensive on two cores (a spawned rank pays ~1.5 s of imports), so
one module-scoped save feeds several assertions. Every spawn runs under the worker's own
collective timeout and pytest-timeout as the hard limit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dist_workers as workers
import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainctl.checkpoint import inspect
from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.layout import step_dir_name
from trainctl.checkpoint.manifest import Manifest
from trainctl.runtime.checkpoint import ModelAndOptimizer

pytestmark = pytest.mark.timeout(300)


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _single_process_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    model = workers.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    workers.train_step(model, optimizer, 0)
    extra = workers.new_extra()
    return model, optimizer, {"app": ModelAndOptimizer(model, optimizer), "extra": extra}


@pytest.fixture(scope="module")
def saved_by_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two FSDP2 ranks train 4 steps and checkpoint steps 2 and 4 to a local root."""
    base = tmp_path_factory.mktemp("two-ranks")
    root = str(base / "ckpt")
    workers.run(
        2,
        workers.save_while_training,
        ([(root, {})], str(base / "saved.pt"), 4),
        str(base),
    )
    return {"root": root, "base": base, **torch.load(base / "saved.pt", weights_only=False)}


def test_two_rank_saves_commit_with_manifests(saved_by_two_ranks: dict[str, Any]) -> None:
    outcome = saved_by_two_ranks["outcomes"][0]
    assert outcome.committed and outcome.step == 4
    names = [name for name, _ in saved_by_two_ranks["events"]]
    assert names == ["checkpoint_committed", "checkpoint_committed"]
    steps = inspect.list_steps(saved_by_two_ranks["root"])
    assert [(s.step, s.committed, s.world_size) for s in steps] == [(2, True, 2), (4, True, 2)]
    for step in (2, 4):
        result = inspect.verify(saved_by_two_ranks["root"], step)
        assert result.ok, result.problems
        manifest = inspect.read_manifest_in(inspect.open_storage(saved_by_two_ranks["root"]), step)
        assert {record.rank for record in manifest.objects} == {0, 1}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} == {
            record.path for record in manifest.objects
        }


def test_restore_resharded_two_to_one_is_bit_identical(saved_by_two_ranks: dict[str, Any]) -> None:
    model, optimizer, state = _single_process_state()
    events: list[tuple[str, dict[str, Any]]] = []
    with Checkpointer(
        saved_by_two_ranks["root"],
        interval_steps=2,
        on_event=lambda n, f: events.append((n, f)),
    ) as checkpointer:
        assert checkpointer.restore_latest(state) == 4
    expected = saved_by_two_ranks["prints"][4]
    got = workers.fingerprint(model, optimizer)
    got["extra.rng"] = state["extra"]["rng"]
    _assert_same(expected, got)
    assert state["extra"]["step"] == 4
    assert state["extra"]["data_position"] == [4, 28]
    assert events[-1][0] == "checkpoint_restored"
    assert events[-1][1]["saved_world_size"] == 2


def test_plain_dcp_load_reads_a_trainctl_checkpoint(saved_by_two_ranks: dict[str, Any]) -> None:
    model, optimizer, _ = _single_process_state()
    extra = workers.new_extra()
    path = f"{saved_by_two_ranks['root']}/{step_dir_name(2)}"
    dcp.load({"app": ModelAndOptimizer(model, optimizer), "extra": extra}, checkpoint_id=path)
    got = workers.fingerprint(model, optimizer)
    got["extra.rng"] = extra["rng"]
    _assert_same(saved_by_two_ranks["prints"][2], got)


def test_restore_on_two_ranks_and_fallbacks(
    saved_by_two_ranks: dict[str, Any], tmp_path: Path
) -> None:
    """One spawn, four roots: 2→2 intact; 2→2 with rank 1's newest shard corrupted (falls back
    to step 2 on both ranks); 2→2 with the newest manifest missing (skipped); 1→2."""
    root = saved_by_two_ranks["root"]
    corrupted, uncommitted = str(tmp_path / "corrupted"), str(tmp_path / "uncommitted")
    shutil.copytree(root, corrupted)
    shutil.copytree(root, uncommitted)
    shard = Path(corrupted) / step_dir_name(4) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (Path(uncommitted) / step_dir_name(4) / "manifest.json").unlink()

    single = str(tmp_path / "single")
    model, optimizer, state = _single_process_state()
    for step in (1, 2, 3):
        workers.train_step(model, optimizer, step)
    state["extra"].update(step=3, data_position=[3, 21], rng=torch.get_rng_state())
    with Checkpointer(single, interval_steps=3) as checkpointer:
        assert checkpointer.save(3, state).result().committed
    single_print = workers.fingerprint(model, optimizer)

    verdict = inspect.verify(corrupted, 4)
    assert not verdict.ok
    assert [problem.path for problem in verdict.problems] == ["__1_0.distcp"]

    out = tmp_path / "restored.pt"
    roots = [(root, {}), (corrupted, {}), (uncommitted, {}), (single, {})]
    workers.run(2, workers.restore, (roots, str(out)), str(tmp_path))
    intact, fallback, skipped, one_to_two = torch.load(out, weights_only=False)

    assert intact["step"] == 4
    _assert_same(
        {k: v for k, v in saved_by_two_ranks["prints"][4].items() if k != "extra.rng"},
        intact["print"],
    )
    assert torch.equal(intact["extra"]["rng"], saved_by_two_ranks["prints"][4]["extra.rng"])

    assert fallback["step"] == 2
    _assert_same(
        {k: v for k, v in saved_by_two_ranks["prints"][2].items() if k != "extra.rng"},
        fallback["print"],
    )
    reasons = [f["reason"] for name, f in fallback["events"] if name == "restore_skipped"]
    assert len(reasons) == 1 and "checksum mismatch" in reasons[0]

    assert skipped["step"] == 2
    name, fields = skipped["events"][0]
    assert (name, fields["step"]) == ("restore_skipped", 4)

    assert one_to_two["step"] == 3
    _assert_same(single_print, one_to_two["print"])
    assert one_to_two["extra"]["data_position"] == [3, 21]


def test_two_ranks_save_to_s3_and_restore_in_one_process(s3: Any, tmp_path: Path) -> None:
    root = s3.root("jobs/ckpt/job-1")
    workers.run(
        2,
        workers.save_while_training,
        ([(root, s3.storage_options)], str(tmp_path / "saved.pt"), 2),
        str(tmp_path),
    )
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    assert saved["outcomes"][0].committed
    assert inspect.verify(root, 2, storage_options=s3.storage_options).ok

    model, optimizer, state = _single_process_state()
    with Checkpointer(root, interval_steps=2, storage_options=s3.storage_options) as checkpointer:
        assert checkpointer.restore_latest(state) == 2
    got = workers.fingerprint(model, optimizer)
    got["extra.rng"] = state["extra"]["rng"]
    _assert_same(saved["prints"][2], got)

    # plain DCP through fsspec reads it too (interop)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # private in 2.13

    model, optimizer, _ = _single_process_state()
    reader = FsspecReader(f"{root}/{step_dir_name(2)}", **s3.storage_options)
    dcp.load(
        {"app": ModelAndOptimizer(model, optimizer), "extra": workers.new_extra()},
        storage_reader=reader,
    )
    _assert_same(
        {k: v for k, v in saved["prints"][2].items() if k != "extra.rng"},
        workers.fingerprint(model, optimizer),
    )


def test_staging_copies_sharded_state_into_its_own_buffers(tmp_path: Path) -> None:
    """Staging FSDP2 state (and a 0-dim DTensor) gives DTensors with the same mesh, placements
    and shape over buffers of their own: training after `stage` leaves the staged copy as it
    was, and the next `stage` reuses the buffers."""
    workers.run(2, workers.stage_sharded_state, (str(tmp_path / "staged.pt"),), str(tmp_path))
    result = torch.load(tmp_path / "staged.pt", weights_only=False)
    assert result["shared_pointers"] == 0
    assert result["allocations"] == 1
    _assert_trees_equal(result["expected_first"], result["first"])
    _assert_trees_equal(result["first"], result["after_training"])
    _assert_trees_equal(result["expected_again"], result["again"])
    with pytest.raises(AssertionError):  # training changed the state: the oracle can fail
        _assert_trees_equal(result["first"], result["again"])


def _assert_trees_equal(expected: Any, got: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(expected, got)
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys()
        for key in expected:
            _assert_trees_equal(expected[key], got[key])
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(got)
        for mine, theirs in zip(expected, got, strict=True):
            _assert_trees_equal(mine, theirs)
    else:
        assert expected == got


def test_the_one_round_gather_carries_values_larger_than_its_slot(tmp_path: Path) -> None:
    """`Collectives.gather` sends a fixed slot per rank; a rank whose value does not fit sends
    the rest point to point, and rank 0 gets every value whole, in rank order."""
    out = tmp_path / "gathered.pt"
    workers.run(3, workers.gather_across_capacity, (str(out),), str(tmp_path))
    result = torch.load(out, weights_only=False)
    assert result["received"] == result["expected"]


def test_a_rank_reads_another_ranks_small_items_through_its_head(tmp_path: Path) -> None:
    """DCP stores replicated items once; trainctl writes them at the head of that rank's file
    and records the head's checksum, so the other rank reads and verifies those few bytes, not
    the file's first block. Restored state is exact; a corrupted head byte is caught and the
    restore falls back to the previous step on both ranks."""
    out = tmp_path / "result.pt"
    root = tmp_path / "ckpt"
    workers.run(2, workers.restore_through_a_head, (str(root), str(out)), str(tmp_path))
    step_dir = root / step_dir_name(2)
    manifest = Manifest.from_json((step_dir / "manifest.json").read_bytes())
    storage_data = dcp.FileSystemReader(str(step_dir)).read_metadata().storage_data
    (where,) = [info for index, info in storage_data.items() if index.fqn == "small"]
    holder = manifest.record(where.relative_path)
    assert holder is not None and where.offset + where.length <= holder.head_size < 64 * 1024
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        assert result["step"] == 2
        assert torch.equal(result["big"], result["expected"][2]["big"])
        assert torch.equal(result["small"], result["expected"][2]["small"])

    shutil.rmtree(root)  # again, and rank 0 corrupts a byte in the head of step 2's file
    torch.save((str(step_dir / holder.path), where.offset + where.length // 2), f"{out}.corrupt")
    again = tmp_path / "again"  # a rendezvous file of its own
    again.mkdir()
    workers.run(2, workers.restore_through_a_head, (str(root), str(out)), str(again))
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        assert result["step"] == 1
        assert torch.equal(result["big"], result["expected"][1]["big"])
        assert torch.equal(result["small"], result["expected"][1]["small"])
    (reason,) = torch.load(f"{out}.0", weights_only=False)["skipped"]  # rank 0 reports events
    assert "checksum mismatch in the head" in reason, reason


def test_a_failure_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    """Rank 1 cannot serialise a value: both ranks report the save failed (none waits forever
    in a collective), nothing is committed, the next saves (a new plan, the cached one, then a
    new plan on rank 1 while rank 0 had started on the cached one) commit, and the last
    restores to the state it saved."""
    root = str(tmp_path / "ckpt")
    out = str(tmp_path / "result.pt")
    workers.run(2, workers.save_with_a_failing_rank, (root, out), str(tmp_path))
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]
    for result in ranks:
        assert [o.status for o in result["outcomes"]] == ["failed"] + ["committed"] * 3
        assert "rank 1" in result["outcomes"][0].reason
        assert "pickle" in result["outcomes"][0].reason.lower()
    assert [e[1]["step"] for e in ranks[0]["events"] if e[0] == "checkpoint_failed"] == [1]
    assert ranks[0]["early_hits"] == 1  # step 3 reused step 2's layout for .metadata
    # What rank 0 wrote of step 1 was never committed: garbage once step 2 committed.
    assert [e[1]["step"] for e in ranks[0]["events"] if e[0] == "gc_deleted"] == [1]
    steps = inspect.list_steps(root)
    assert [(s.step, s.committed) for s in steps] == [(2, True), (3, True), (4, True)]
    restored = str(tmp_path / "restored.pt")
    (tmp_path / "one").mkdir()
    workers.run(1, workers.restore, ([(root, {})], restored), str(tmp_path / "one"))
    [result] = torch.load(restored, weights_only=False)
    assert result["step"] == 4
    _assert_same(ranks[0]["print"], result["print"])
