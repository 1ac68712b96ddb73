"""The job's c10d rendezvous store, hosted by the controller.

Hosting it needs torch (its `TCPStore`): ~1 s of CPU to import, which sat between a job's
creation and its agents' start until `RendezvousStore` moved it onto a thread.
"""

from __future__ import annotations

import threading
from typing import Any


def start_rendezvous_store(host: str, port: int = 0) -> tuple[Any, int]:
    """Host the c10d rendezvous TCPStore on `port` (0: one the OS chooses). Returns (store,
    port)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    return store, int(store.port)


class RendezvousStore:
    """`start_rendezvous_store` on a thread: its torch import (~1 s of CPU) overlaps the
    agents' start instead of delaying it. `port` waits for it (first needed to plan an
    attempt or probe a spare) and raises what starting it raised."""

    def __init__(self, host: str, port: int) -> None:
        self._store: Any = None
        self._port = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._start, args=(host, port), name="rdzv-store", daemon=True
        )
        self._thread.start()

    def _start(self, host: str, port: int) -> None:
        try:
            self._store, self._port = start_rendezvous_store(host, port)
        except BaseException as error:  # raised where the port is needed
            self._error = error

    def port(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._port

    def close(self) -> None:
        self._thread.join()
        self._store = None
