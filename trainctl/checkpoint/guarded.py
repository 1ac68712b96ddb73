"""A checkpoint storage wrapped by a check before each request (the base of the edge
wrappers: `trainctl.checkpoint.outage.InjectedOutage` refuses every request during an injected
outage, `trainctl.checkpoint.fence.FencedStorage` refuses the writes of a superseded attempt).
"""

from __future__ import annotations

from trainctl.checkpoint.manifest import ObjectRecord
from trainctl.checkpoint.storage import (
    BytesLike,
    ObjectWriter,
    PendingUpload,
    SpanRead,
    Storage,
    WrittenObject,
)


class GuardedStorage(Storage):
    """Delegates every request to `inner`, calling `_check` first (``write``: the request
    creates, replaces or deletes something)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner.root, inner.config)
        self.inner = inner

    def _check(self, write: bool) -> None:
        """Raise to refuse the request."""

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def key_of(self, url: str) -> str:
        return self.inner.key_of(url)

    def open_writer(self, key: str) -> ObjectWriter:
        self._check(write=True)
        return self.inner.open_writer(key)

    def put(self, key: str, data: BytesLike, *, exclusive: bool = False) -> WrittenObject:
        self._check(write=True)
        return self.inner.put(key, data, exclusive=exclusive)

    def read(
        self, key: str, start: int = 0, end: int | None = None, record: ObjectRecord | None = None
    ) -> memoryview:
        self._check(write=False)
        return self.inner.read(key, start, end, record)

    def read_span(self, key: str, start: int, end: int, record: ObjectRecord | None) -> SpanRead:
        self._check(write=False)
        return self.inner.read_span(key, start, end, record)

    def size(self, key: str) -> int | None:
        self._check(write=False)
        return self.inner.size(key)

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        self._check(write=False)
        return self.inner.list_objects(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        self._check(write=False)
        return self.inner.list_dirs(prefix)

    def delete(self, key: str) -> None:
        self._check(write=True)
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self._check(write=True)
        return self.inner.delete_prefix(prefix)

    def is_temporary(self, key: str) -> bool:
        return self.inner.is_temporary(key)

    def rename(self, key: str, new_key: str) -> None:
        self._check(write=True)
        self.inner.rename(key, new_key)

    def make_dirs(self, key: str) -> None:
        self._check(write=True)
        self.inner.make_dirs(key)

    def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        self._check(write=False)
        return self.inner.list_uploads(prefix)

    def abort_upload(self, upload: PendingUpload) -> None:
        self._check(write=True)
        self.inner.abort_upload(upload)

    def close(self) -> None:
        self.inner.close()
