"""The checkpoint fence: a superseded attempt's writes are refused, on file:// and S3."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoint.test_ckpt_storage import _open
from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.fence import FencedError, FencedStorage, advance, read_fence


def test_writes_of_an_earlier_attempt_are_refused_reads_are_not(storage_root: Any) -> None:
    storage = _open(storage_root)
    assert read_fence(storage) is None
    orphan, current = FencedStorage(storage, attempt=0), FencedStorage(storage, attempt=1)
    orphan.put("step-000000005/a", b"before the fence: allowed")  # no fence yet
    advance(storage, 0)
    orphan.put("step-000000005/b", b"its own attempt: allowed")
    advance(storage, 1)  # attempt 1 starts: attempt 0 is superseded
    assert read_fence(storage) == 1
    for write in (
        lambda: orphan.put("step-000000005/c", b"late"),
        lambda: orphan.open_writer("step-000000010/__0_0.distcp"),
        lambda: orphan.delete_prefix("step-000000005"),
        lambda: orphan.delete("step-000000005/a"),
    ):
        with pytest.raises(FencedError, match="attempt 0 was superseded by attempt 1"):
            write()
    assert bytes(orphan.read("step-000000005/a")) == b"before the fence: allowed"
    current.put("step-000000005/c", b"the current attempt writes")
    with pytest.raises(FencedError):
        advance(storage, 0)  # the fence never goes down
    storage.close()


def test_an_orphan_checkpointer_cannot_commit(tmp_path: Any) -> None:
    import torch

    root = str(tmp_path / "ckpt")
    plain = Checkpointer(root, interval_steps=1, keep_last=2)
    advance(plain.storage, 3)
    orphan = Checkpointer(
        root, interval_steps=1, keep_last=2, storage=FencedStorage(plain.storage, attempt=2)
    )
    outcome = orphan.save(1, {"w": torch.ones(4)}).result()
    assert outcome.status == "failed" and "superseded by attempt 3" in outcome.reason
    assert not list((tmp_path / "ckpt").glob("step-*/manifest.json"))  # nothing committed
    orphan.close()
    plain.close()
