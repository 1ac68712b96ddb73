"""The memory tier in one process (no process group): real slots in a tmpfs directory and a
durable file:// root; the tier order, torn memory copies falling back to durable storage with
the event, the budget refusal, and the memory held flat over 200 steps. (Corrupted copies and
reshards through the slot reader: test_ckpt_slots.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import (
    DURABLE_TIER,
    MEMORY_TIER,
    SLOT_BUFFER_BYTES,
    host_scope,
    memory_budget,
    memory_root,
    release_memory,
    restore_tiers,
    tier_order,
)
from trainctl.checkpoint.slot_layout import SLOT_COUNT, SLOTS_DIR, record_name
from trainctl.runtime.memory_tier import MemoryTier, state_bytes
from trainctl.spec import CheckpointSpec

SHM = "/dev/shm"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        self.events.append((name, fields))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]


def _state(seed: int, numel: int = 50_000) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(numel, generator=generator), "extra": {"step": seed}}


def _blank() -> dict[str, Any]:
    state = _state(0)
    state["w"].zero_()
    state["extra"]["step"] = -1
    return state


@pytest.fixture
def shm_base(tmp_path: Path) -> Any:
    """A private directory in the host's tmpfs (the memory tier's real home), removed after."""
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    base = os.path.join(SHM, f"trainctl-test-{os.getpid()}-{tmp_path.name}")
    os.makedirs(base)
    yield base
    import shutil

    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    ("memory", "durable", "order"),
    [
        (None, None, [DURABLE_TIER]),
        (None, 10, [DURABLE_TIER]),
        (12, 10, [MEMORY_TIER, DURABLE_TIER]),
        (10, 10, [MEMORY_TIER, DURABLE_TIER]),
        (12, None, [MEMORY_TIER, DURABLE_TIER]),
        (8, 10, [DURABLE_TIER]),  # a stale memory tier is never preferred to newer storage
    ],
)
def test_tier_order(memory: int | None, durable: int | None, order: list[str]) -> None:
    assert tier_order(memory, durable) == order


BUF = SLOT_BUFFER_BYTES


@pytest.mark.parametrize(
    ("shard", "ranks", "replicas", "free", "fits"),
    [
        (100, 2, 0, (SLOT_COUNT * 100 + BUF) * 2, True),
        (100, 2, 0, (SLOT_COUNT * 100 + BUF) * 2 - 1, False),
        (100, 2, 1, (SLOT_COUNT * 2 * 100 + BUF) * 2, True),
        (100, 2, 1, (SLOT_COUNT * 2 * 100 + BUF) * 2 - 1, False),
        (100, 1, 2, SLOT_COUNT * 3 * 100 + BUF, True),
        (0, 8, 1, 8 * BUF, True),
        (2**30, 8, 0, 2**34 + 8 * BUF, True),  # 8 ranks x 2 slots of 1 GiB + 8 buffers
        (2**30, 8, 0, 2**34 + 8 * BUF - 1, False),
    ],
)
def test_memory_budget(shard: int, ranks: int, replicas: int, free: int, fits: bool) -> None:
    """Own slots plus one set per replica, SLOT_COUNT slots each, plus a fixed buffer, per rank
    on the host: (1 + replicas) x 2 x state, not a multiple of steps."""
    budget = memory_budget(shard, ranks, free, replicas)
    assert budget.fits is fits, budget.reason
    if not fits:
        assert "memory tier off" in budget.reason and "checkpoint.memory" in budget.reason


@pytest.mark.parametrize(
    ("hosts", "replicas", "says"),
    [
        (["a"], 1, "a, 1 replica"),
        (["a", "a", "a"], 0, "a, 0 replica"),
        (["a", "b"], 1, "2 hosts, 1 replica"),
        ([f"h{i}" for i in range(9)], 0, "durable storage restores"),
    ],
)
def test_host_scope_keeps_the_tier_on_several_hosts(
    hosts: list[str], replicas: int, says: str
) -> None:
    scope = host_scope(hosts, replicas)
    assert scope.fits and says in scope.reason, scope.reason


def test_memory_spec_defaults_and_bounds() -> None:
    spec = CheckpointSpec()
    assert spec.memory.enabled is False and spec.memory.interval_steps == 1
    with pytest.raises(ValueError, match="interval_steps"):
        CheckpointSpec.model_validate({"memory": {"enabled": True, "interval_steps": 0}})
    with pytest.raises(ValueError, match="replica"):
        CheckpointSpec.model_validate({"memory": {"replica": 1}})
    assert spec.memory.replicas == 1
    with pytest.raises(ValueError, match="replicas"):
        CheckpointSpec.model_validate({"memory": {"replicas": -1}})


def _tiers(shm_base: str, tmp_path: Path, events: Recorder) -> tuple[MemoryTier, Checkpointer]:
    memory = MemoryTier.open(memory_root("job", shm_base), 1, on_event=events)
    durable = Checkpointer(
        f"file://{tmp_path}/durable", interval_steps=10, on_event=events, pin_memory=False
    )
    return memory, durable


def test_restore_prefers_memory_and_falls_back_when_no_slot_is_whole(
    shm_base: str, tmp_path: Path
) -> None:
    events = Recorder()
    memory, durable = _tiers(shm_base, tmp_path, events)
    for step in range(1, 13):
        memory.save(step, _state(step))
        if durable.should_save(step):
            durable.save(step, _state(step))
    durable.wait()
    root = memory_root("job", shm_base)
    slots = os.path.join(root, SLOTS_DIR)
    assert sorted(n for n in os.listdir(slots) if n.endswith(".json")) == [
        "rank-00000.layout.json",
        record_name(0, 0),
        record_name(0, 1),
    ]
    assert not [e for e in events.of("checkpoint_committed") if e.get("tier") == MEMORY_TIER]

    state = _blank()
    assert restore_tiers(memory.restorer, durable, state, events) == 12
    assert torch.equal(state["w"], _state(12)["w"]) and state["extra"]["step"] == 12
    assert events.of("checkpoint_restored")[-1]["tier"] == MEMORY_TIER

    # Both slots torn (their records gone, as while being rewritten): durable storage's step
    # 10, with an event naming the memory tier and why.
    for slot in range(SLOT_COUNT):
        os.unlink(os.path.join(slots, record_name(0, slot)))
    state = _blank()
    assert restore_tiers(memory.restorer, durable, state, events) == 10
    assert torch.equal(state["w"], _state(10)["w"])
    skipped = [e for e in events.of("restore_skipped") if e.get("tier") == MEMORY_TIER]
    assert skipped and "no step" in skipped[-1]["reason"], skipped
    assert events.of("checkpoint_restored")[-1]["tier"] == DURABLE_TIER
    memory.close()
    durable.close()
    assert release_memory("job", shm_base) and not os.path.exists(root)
    assert not release_memory("job", shm_base)


def test_no_memory_tier_restores_durable_and_says_so(shm_base: str, tmp_path: Path) -> None:
    events = Recorder()
    memory, durable = _tiers(shm_base, tmp_path, events)
    durable.save(10, _state(10))
    durable.wait()
    state = _blank()
    assert restore_tiers(None, durable, state, events) == 10  # no tier: durable, nothing said
    assert not events.of("restore_skipped")
    state = _blank()
    assert restore_tiers(memory.restorer, durable, state, events) == 10
    reasons = [e["reason"] for e in events.of("restore_skipped")]
    assert any("no step to restore in memory" in r and "no slot layout" in r for r in reasons)
    memory.close()
    durable.close()


def test_a_tier_that_does_not_fit_turns_itself_off(shm_base: str, tmp_path: Path) -> None:
    events = Recorder()
    memory, durable = _tiers(shm_base, tmp_path, events)
    huge = {"w": torch.empty(0)}
    free = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    # A state the tmpfs cannot hold twice: measured, not allocated (an expanded view).
    huge["w"] = torch.zeros(1).expand(free // 4 // 2 + 1)
    assert state_bytes(huge) * SLOT_COUNT > free
    memory.save(1, huge)
    assert not memory.enabled and not memory.should_save(2)
    failed = events.of("checkpoint_failed")
    assert failed and "memory tier off" in failed[0]["error"] and failed[0]["tier"] == MEMORY_TIER
    assert not os.path.exists(os.path.join(memory_root("job", shm_base), SLOTS_DIR))
    memory.close()
    durable.close()


def _bytes_under(root: str) -> int:
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:  # a temporary name renamed meanwhile
                pass
    return total


def test_memory_held_flat_over_200_steps(shm_base: str, tmp_path: Path) -> None:
    """SLOT_COUNT slots of the state and a few small files, whatever the step count."""
    events = Recorder()
    memory, durable = _tiers(shm_base, tmp_path, events)
    root = memory_root("job", shm_base)
    one_step = state_bytes(_state(1))
    peak = 0
    for step in range(1, 201):
        memory.save(step, _state(step))
        peak = max(peak, _bytes_under(root))
    assert memory.writer.nbytes < one_step + 64 * 1024
    assert peak <= SLOT_COUNT * memory.writer.nbytes + 64 * 1024, (peak, one_step)
    assert len(os.listdir(os.path.join(root, SLOTS_DIR))) == 1 + 2 * SLOT_COUNT
    assert not events.of("checkpoint_failed")
    memory.close()
    durable.close()
