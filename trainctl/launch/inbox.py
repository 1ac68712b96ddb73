"""The controller's inbox of agent messages: a FIFO queue in which a lost node jumps ahead.

At 1,024 nodes the agents' progress comes in bursts (every node reaches a step at about the
same time): a thousand lines queued, a few hundred milliseconds of the controller's work. A
node lost in such a burst waited behind it (failure -> decision 240-390 ms). Here a
`Disconnected`, or an `Exit` that is not a clean one, goes to the head of the queue — with
every message of the same node queued before it, in their order, so a node's own messages
are never reordered (its hello before its loss, its last checkpoint before its exit).
"""

from __future__ import annotations

import collections
import queue
from typing import Any

from trainctl.protocol import Disconnected, Envelope, Exit


def urgent(envelope: Envelope) -> bool:
    """Whether a message jumps the queue: a node lost, or its torchrun failed."""
    message = envelope.message
    return isinstance(message, Disconnected) or (
        isinstance(message, Exit) and message.code != 0 and not message.stopped
    )


class Inbox(queue.Queue[Envelope]):
    """`queue.Queue` of `Envelope`s (the same get/put) with an urgent lane served first."""

    def _init(self, maxsize: int) -> None:
        self.queue: collections.deque[Any] = collections.deque()
        self._urgent: collections.deque[Envelope] = collections.deque()

    def _qsize(self) -> int:
        return len(self.queue) + len(self._urgent)

    def _put(self, item: Envelope) -> None:
        if not urgent(item):
            self.queue.append(item)
            return
        # O(queued) once per lost node: the node's earlier messages go first, in order.
        node = item.node
        if any(queued.node == node for queued in self.queue):
            keep: collections.deque[Any] = collections.deque()
            for queued in self.queue:
                (self._urgent if queued.node == node else keep).append(queued)
            self.queue = keep
        self._urgent.append(item)

    def put_many(self, items: list[Envelope]) -> None:
        """`put` each of `items` in order, waking a waiting reader once (the control server's
        read loop hands over a round of every connection's lines at a time)."""
        if not items:
            return
        with self.not_empty:
            for item in items:
                self._put(item)
            self.unfinished_tasks += len(items)
            self.not_empty.notify()

    def _get(self) -> Envelope:
        return self._urgent.popleft() if self._urgent else self.queue.popleft()
