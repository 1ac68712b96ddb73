"""The few collectives a checkpoint save and restore need, on the checkpointer's own group.

Small integer agreements go as tensors; objects as pickles. `gather` is one round (a fixed slot
per rank, the overflow point to point) because it sits on the save's critical path, after the
last shard is written.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

GATHER_CAPACITY = 16 * 1024
"""`Collectives.gather`'s first slot size (then the largest pickle it received, rounded up)."""
_LENGTH_BYTES = 8


class Collectives:
    """The few collectives a save needs, on `group` (None: one process, no collectives)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.gather_capacity = GATHER_CAPACITY
        """Bytes of each rank's slot in `gather`: equal on every rank (see `gather`)."""
        self.largest_gathered = 0
        """Rank 0: the largest pickle the last `gather` received."""

    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise max over ranks (one small all_reduce)."""
        if self.group is None:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [int(value) for value in tensor.tolist()]

    def max_ints_async(self, values: list[int]) -> Callable[[], list[int]]:
        """`max_ints` started now; the returned function waits for it and returns it."""
        if self.group is None:
            return lambda: values
        tensor = torch.tensor(values, dtype=torch.int64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        assert work is not None

        def wait() -> list[int]:
            work.wait()
            return [int(value) for value in tensor.tolist()]

        return wait

    def broadcast_ints(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (one small broadcast)."""
        if self.group is None:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(tensor, group=self.group, group_src=0)
        return [int(value) for value in tensor.tolist()]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on rank 0 ([] elsewhere).

        One round: each rank sends its pickle's length and first `gather_capacity` bytes in a
        slot of that size, and only a rank whose pickle is longer sends the rest, point to
        point. ``gather_object`` takes two rounds (an all_gather of the lengths, then the
        gather); after the idle wait for the last shard each round cost ~0.5-2 ms here.
        `gather_capacity` must be equal on every rank: callers change it only to a value
        every rank received (`save_step` sends rank 0's `largest_gathered` with its outcome).
        """
        if self.group is None:
            return [value]
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        capacity = self.gather_capacity
        slot = torch.zeros(_LENGTH_BYTES + capacity, dtype=torch.uint8)
        slot[:_LENGTH_BYTES] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        head = data[:capacity]
        if head:
            slot[_LENGTH_BYTES : _LENGTH_BYTES + len(head)] = torch.frombuffer(
                bytearray(head), dtype=torch.uint8
            )
        slots = [torch.empty_like(slot) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(slot, slots, group=self.group, group_dst=0)
        if slots is None:
            if len(data) > capacity:
                rest = torch.frombuffer(bytearray(data[capacity:]), dtype=torch.uint8)
                dist.send(rest, group=self.group, group_dst=0)
            return []
        gathered: list[Any] = []
        lengths = [int(s[:_LENGTH_BYTES].view(torch.int64).item()) for s in slots]
        for rank, (received, length) in enumerate(zip(slots, lengths, strict=True)):
            if rank == self.rank:
                gathered.append(value)
                continue
            payload = received[_LENGTH_BYTES : _LENGTH_BYTES + min(length, capacity)]
            if length > capacity:
                rest = torch.empty(length - capacity, dtype=torch.uint8)
                dist.recv(rest, group=self.group, group_src=rank)
                payload = torch.cat([payload, rest])
            gathered.append(pickle.loads(payload.numpy().tobytes()))
        self.largest_gathered = max(lengths)
        return gathered

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.group is None:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def scatter(self, values: list[Any] | None) -> Any:
        """``values[r]`` (given on rank 0) on rank r."""
        if self.group is None:
            assert values is not None
            return values[0]
        box: list[Any] = [None]
        dist.scatter_object_list(box, values, group=self.group, group_src=0)
        return box[0]
