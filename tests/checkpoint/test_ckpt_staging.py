"""Staging hands out the staged state before its copy finishes: its tensors are readable once
the copy is done, never before, and a failed copy releases whoever waits."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from trainctl.checkpoint.staging import Stager, StagingFailed

pytestmark = pytest.mark.timeout(60)


def _reader(staged: Any, seen: list[Any]) -> threading.Thread:
    def read() -> None:
        try:
            staged.wait()
            seen.append({name: staged.state[name].clone() for name in ("big", "small")})
        except StagingFailed as error:
            seen.append(error)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_staged_state_is_readable_once_its_copy_finished() -> None:
    live = {"big": torch.randn(1_000_000), "small": torch.randn(10), "plain": [3, "x"]}
    stager = Stager(pin_memory=False)
    staged = stager.begin(live)
    assert staged.state["plain"] == [3, "x"]  # the layout is there before any byte is copied
    assert staged.state["big"].data_ptr() != live["big"].data_ptr()
    seen: list[Any] = []
    reader = _reader(staged, seen)
    reader.join(timeout=0.2)
    assert reader.is_alive() and seen == []  # nothing is copied yet: the reader waits
    staged.copy()
    reader.join(timeout=10)
    assert len(seen) == 1
    for name in ("big", "small"):
        assert torch.equal(seen[0][name], live[name])
    assert staged.copied_at is not None
    live["big"].add_(1.0)  # training goes on: the staged copy stays as it was
    assert torch.equal(staged.state["big"], seen[0]["big"])
    again = stager.begin(live)
    again.copy()
    assert again.state["big"].data_ptr() == staged.state["big"].data_ptr()  # buffers reused
    assert again.generation == staged.generation == stager.num_allocations == 1
    assert torch.equal(again.state["big"], live["big"])


def test_a_failed_copy_raises_and_releases_the_waiters() -> None:
    live = {"big": torch.ones(3), "small": torch.empty(4, device="meta")}
    staged = Stager(pin_memory=False).begin(live)
    seen: list[Any] = []
    reader = _reader(staged, seen)
    with pytest.raises(NotImplementedError):
        staged.copy()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], StagingFailed)
