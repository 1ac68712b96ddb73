"""A training loop's saves with both tiers on (one process, no process group): a step on both
intervals builds the model's and optimizer's state dict once, a memory-only step not at all,
and both tiers hold that step with the same weights, which each restores bit for bit."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.memory import memory_root
from trainctl.runtime.checkpoint import ModelAndOptimizer, TrainingCheckpoint
from trainctl.runtime.memory_tier import MemoryTier

SHM = "/dev/shm"


class CountingModelAndOptimizer(ModelAndOptimizer):
    """The real Stateful, counting how often a save asked it for its state dict."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        return super().state_dict()


@pytest.fixture
def shm_base(tmp_path: Path) -> Iterator[str]:
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm on this host")
    base = os.path.join(SHM, f"trainctl-test-{os.getpid()}-{tmp_path.name}")
    os.makedirs(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    inputs = torch.Generator().manual_seed(step)
    model(torch.randn(8, 16, generator=inputs)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _training_checkpoint(
    shm_base: str, durable_root: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingCheckpoint:
    memory = MemoryTier.open(memory_root("job", shm_base), 1, on_event=lambda *_: None)
    durable = Checkpointer(durable_root, interval_steps=5, pin_memory=False)
    return TrainingCheckpoint(durable, model, optimizer, memory=memory)


def test_a_step_on_both_intervals_builds_the_state_dict_once(shm_base: str, tmp_path: Path) -> None:
    model, optimizer = _model(0)
    ckpt = _training_checkpoint(shm_base, f"file://{tmp_path}/durable", model, optimizer)
    counting = CountingModelAndOptimizer(model, optimizer)
    ckpt.state["app"] = counting
    calls = []
    for step in range(1, 6):
        _train(model, optimizer, step)
        before = counting.calls
        assert ckpt.maybe_save(step)
        calls.append(counting.calls - before)
    ckpt.finish()
    # Step 1: the memory tier's first save builds the state dict (and measures what it
    # flattened: no second one); steps 2-4: the memory tier alone, from the cached live state
    # dict (no get_state_dict); step 5: memory and durable storage, from one fresh state dict.
    assert calls == [1, 0, 0, 0, 1]
    assert ckpt.checkpointer.last_committed_step == 5
    assert ckpt.memory is not None and ckpt.memory.writer.layout is not None
    weights = {name: value.clone() for name, value in model.state_dict().items()}

    # Each tier holds step 5's weights: restore from each into a fresh model.
    for tier in ("memory", "durable"):
        fresh, fresh_optimizer = _model(1)
        restoring = _training_checkpoint(
            shm_base, f"file://{tmp_path}/durable", fresh, fresh_optimizer
        )
        assert restoring.memory is not None
        source = restoring.memory.restorer if tier == "memory" else restoring.checkpointer
        if tier == "memory":
            assert restoring.memory.restorer.newest_listed_step() == 5
        assert source.restore_latest(restoring.state) == 5
        assert restoring.trainer.step == 5
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, weights[name]), (tier, name)
        restoring.finish()
