"""The holder's side of one slot per copy (``checkpoint.memory.slots: 1``): the permit it
publishes to its workers and the lock it holds while it sends a slot
(`trainctl.checkpoint.memory` has the rule, `trainctl.checkpoint.slots` the worker's side)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from trainctl.checkpoint.memory import permit_of
from trainctl.checkpoint.slot_layout import (
    PERMIT_NAME,
    SlotRecord,
    read_json,
    record_name,
    slot_lock,
    slot_name,
    write_json_atomic,
)


class Rewritten(Exception):
    """The worker rewrote a slot before its send began: the round ends, no peer is to blame."""


class PermitWriter:
    """``slots/replicated.json`` of one node's slots folder, written (by a rename: the workers
    notice it by one ``stat``) only when it changed."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._written: dict[str, object] | None = None
        self._lock = threading.Lock()  # the tick and the replication thread both publish

    def publish(
        self,
        replicated: tuple[int, int] | None,
        has_targets: bool,
        failed_rounds: int,
        apart: bool,
    ) -> None:
        permit = permit_of(replicated, has_targets, failed_rounds, apart).to_json()
        with self._lock:
            if permit == self._written:
                return
            os.makedirs(self.folder, exist_ok=True)
            write_json_atomic(os.path.join(self.folder, PERMIT_NAME), permit)
            self._written = permit


@contextlib.contextmanager
def sending(folder: str, rank: int, index: int, record: SlotRecord) -> Iterator[str]:
    """The path of `rank`'s slot `index` in `folder`, locked against its worker's writes (one
    under way ends first), while it still holds `record`; raises `Rewritten` when it does not."""
    path = os.path.join(folder, slot_name(rank, index))
    try:
        with slot_lock(path):
            again = read_json(os.path.join(folder, record_name(rank, index)))
            if SlotRecord.from_json(again) != record:
                raise Rewritten(f"rank {rank}: slot {index} was rewritten")
            yield path
    except FileNotFoundError as error:  # the slot file was replaced or dropped
        raise Rewritten(str(error)) from error
