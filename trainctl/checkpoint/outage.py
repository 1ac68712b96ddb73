"""Testing: a checkpoint storage that refuses every request during an injected outage.

`trainctl launch --fault storage-outage@step=N,for=S`: the controller writes
``<faults dir>/storage-outage`` holding the time the outage ends (`trainctl.recovery.faults`);
the worker runtime wraps its checkpoint storage in `InjectedOutage` only when the job planned
such a fault (the faults directory is in its settings). Nothing else reads the file.
"""

from __future__ import annotations

import time
from pathlib import Path

from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.checkpoint.storage import (
    BytesLike,
    ObjectWriter,
    PendingUpload,
    SpanRead,
    Storage,
    WrittenObject,
)

OUTAGE_FILE = "storage-outage"


class InjectedOutage(Storage):
    """`trainctl launch --fault storage-outage`: while ``<faults dir>/storage-outage`` holds a
    time in the future, every request fails as a refused connection would (a testing feature;
    the file is written by the controller, which lifts it when the outage ends)."""

    def __init__(self, inner: Storage, flag: Path) -> None:
        super().__init__(inner.root, inner.config)
        self.inner = inner
        self.flag = flag

    def _check(self) -> None:
        try:
            until = float(self.flag.read_text().strip())
        except (OSError, ValueError):
            return
        if time.time() < until:
            raise ConnectionRefusedError(f"injected storage outage until {until:.0f}")

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def key_of(self, url: str) -> str:
        return self.inner.key_of(url)

    def open_writer(self, key: str) -> ObjectWriter:
        self._check()
        return self.inner.open_writer(key)

    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        self._check()
        return self.inner.put(key, data, exclusive=exclusive)

    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        self._check()
        return self.inner.read(key, start, end, record)

    def read_span(self, key: str, start: int, end: int, record: ObjectRecord | None) -> SpanRead:
        self._check()
        return self.inner.read_span(key, start, end, record)

    def size(self, key: str) -> int | None:
        self._check()
        return self.inner.size(key)

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        self._check()
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        self._check()
        return self.inner.list_dirs(prefix)

    def delete(self, key: str) -> None:
        self._check()
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self._check()
        return self.inner.delete_prefix(prefix)

    def is_temporary(self, key: str) -> bool:
        return self.inner.is_temporary(key)

    def rename(self, key: str, new_key: str) -> None:
        self._check()
        self.inner.rename(key, new_key)

    def make_dirs(self, key: str) -> None:
        self._check()
        self.inner.make_dirs(key)

    def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        self._check()
        return self.inner.list_uploads(prefix)

    def abort_upload(self, upload: PendingUpload) -> None:
        self._check()
        self.inner.abort_upload(upload)

    def close(self) -> None:
        self.inner.close()
