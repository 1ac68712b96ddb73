"""Testing: a checkpoint storage that refuses every request during an injected outage.

`trainctl launch --fault storage-outage@step=N,for=S`: the controller writes
``<faults dir>/storage-outage`` holding the time the outage ends (`trainctl.recovery.faults`);
the worker runtime wraps its checkpoint storage in `InjectedOutage` only when the job planned
such a fault (the faults directory is in its settings). Nothing else reads the file.
"""

from __future__ import annotations

import time
from pathlib import Path

from trainctl.checkpoint.guarded import GuardedStorage
from trainctl.checkpoint.storage import Storage

OUTAGE_FILE = "storage-outage"


class InjectedOutage(GuardedStorage):
    """`trainctl launch --fault storage-outage`: while ``<faults dir>/storage-outage`` holds a
    time in the future, every request fails as a refused connection would (a testing feature;
    the file is written by the controller, which lifts it when the outage ends)."""

    def __init__(self, inner: Storage, flag: Path) -> None:
        super().__init__(inner)
        self.flag = flag

    def _check(self, write: bool) -> None:
        try:
            until = float(self.flag.read_text().strip())
        except (OSError, ValueError):
            return
        if time.time() < until:
            raise ConnectionRefusedError(f"injected storage outage until {until:.0f}")
