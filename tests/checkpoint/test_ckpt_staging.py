"""Staging hands out the staged state before its copy finishes: each tensor is readable once
its own copy is done, never before, and a failed copy releases whoever waits."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from trainctl.checkpoint.staging import Stager, StagingFailed

pytestmark = pytest.mark.timeout(60)


def _reader(staged: Any, names: list[str], seen: list[tuple[str, Any]]) -> threading.Thread:
    def read() -> None:
        for name in names:
            try:
                staged.wait_for(staged.state[name])
                seen.append((name, staged.state[name].clone()))
            except StagingFailed as error:
                seen.append((name, error))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_staged_tensor_is_readable_once_its_copy_finished() -> None:
    live = {"big": torch.randn(1_000_000), "small": torch.randn(10), "plain": [3, "x"]}
    stager = Stager(pin_memory=False)
    staged = stager.begin(live)
    assert staged.state["plain"] == [3, "x"]
    assert staged.state["big"].data_ptr() != live["big"].data_ptr()
    seen: list[tuple[str, Any]] = []
    reader = _reader(staged, ["small", "big"], seen)
    reader.join(timeout=0.2)
    assert reader.is_alive() and seen == []  # nothing is copied yet: the reader waits
    staged.copy()
    reader.join(timeout=10)
    assert [name for name, _ in seen] == ["small", "big"]
    for name, copy in seen:
        assert torch.equal(copy, live[name])
    assert staged.copied_at is not None
    live["big"].add_(1.0)  # training goes on: the staged copy stays as it was
    assert torch.equal(staged.state["big"], seen[1][1])
    again = stager.begin(live)
    again.copy()
    assert again.state["big"].data_ptr() == staged.state["big"].data_ptr()  # buffers reused
    assert stager.num_allocations == 1


def test_a_failed_copy_raises_and_releases_the_waiters() -> None:
    live = {"fine": torch.ones(3), "unreadable": torch.empty(4, device="meta")}
    staged = Stager(pin_memory=False).begin(live)
    seen: list[tuple[str, Any]] = []
    reader = _reader(staged, ["fine", "unreadable"], seen)
    with pytest.raises(NotImplementedError):
        staged.copy()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert seen[0][0] == "fine" and torch.equal(seen[0][1], torch.ones(3))
    assert seen[1][0] == "unreadable" and isinstance(seen[1][1], StagingFailed)
