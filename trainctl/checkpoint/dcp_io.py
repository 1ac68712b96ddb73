"""torch.distributed.checkpoint (DCP) reading and writing through trainctl's storage seam.

DCP's own `FileSystemWriter`/`FileSystemReader` keep the file format (``.metadata`` plus
``__<rank>_<n>.distcp``) and delegate every byte to a `FileSystemBase`; this module provides one
backed by `Storage`, so a trainctl checkpoint stays a standard DCP checkpoint that plain
``dcp.load(..., checkpoint_id=path)`` or `FsspecReader` can read, while trainctl gets:

* concurrent multipart uploads and checksums of every object written (`written_objects`);
* verified reads: with a manifest, every block read is checked against its CRC, and a
  resharding load reads only the byte span each rank needs (block-aligned), concurrently.

The public DCP classes are used (`FileSystemWriter`, `FileSystemReader`, `FileSystemBase`);
what they do with the file system object is stable across torch 2.x (`FsspecWriter` relies on
the same seam).
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any, cast

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import (
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from torch.utils.serialization import config as serialization_config

from trainctl.checkpoint.layout import join
from trainctl.checkpoint.manifest import Manifest
from trainctl.checkpoint.staging import Staged
from trainctl.checkpoint.storage import ObjectWriter, SpanRead, Storage, WrittenObject


class _SpanReader(io.RawIOBase):
    """A seekable read-only stream over a `SpanRead` (no copy).

    Reads block until the bytes they cover have arrived and been verified, so DCP deserialises
    the front of a shard while the rest is still downloading. DCP seeks use object offsets;
    the span may start past 0 when only part of the object was fetched.
    """

    def __init__(self, span: SpanRead) -> None:
        super().__init__()
        self._span = span
        self._position = span.first

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            self._position = self._span.last + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        start = self._position - self._span.first
        if start < 0:
            raise OSError(f"read at {self._position} before the fetched span at {self._span.first}")
        target = memoryview(buffer).cast("B")
        self._span.ready(self._position + len(target))
        chunk = self._span.data[start : start + len(target)]
        target[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


class StorageFileSystem(FileSystemBase):
    """DCP's file-system seam over a `Storage`; records what it wrote, verifies what it reads.

    Paths DCP hands in are full URLs under ``storage.root`` (DCP joins the checkpoint path with
    file names through `concat_path`).
    """

    def __init__(self, storage: Storage, manifest: Manifest | None = None) -> None:
        self.storage = storage
        self.manifest = manifest
        self._written: dict[str, WrittenObject] = {}
        self._spans: dict[str, SpanRead] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads
        self.publish_gate: Callable[[], None] | None = None
        """Called before a written object is published (its writer closed): may block, and
        raises to abandon the object (it is discarded, never published)."""

    def written_objects(self) -> dict[str, WrittenObject]:
        """Objects this instance wrote and that still exist: key -> size and checksums."""
        with self._lock:
            return dict(self._written)

    def _record(self, key: str) -> Any:
        if self.manifest is None:
            return None
        return self.manifest.record(key.rsplit("/", 1)[-1])

    @contextmanager
    def create_stream(
        self, path: str | os.PathLike[str], mode: str
    ) -> Generator[io.IOBase, None, None]:
        key = self.storage.key_of(os.fspath(path))
        if "w" in mode:
            writer = self.storage.open_writer(key)
            writer.before_publish = self.publish_gate  # DCP closes the stream itself
            try:
                yield cast(io.IOBase, writer)
                written = writer.close()  # no-op when DCP closed it (idempotent)
            except BaseException:
                writer.abort()
                raise
            with self._lock:
                self._written[key] = written
            return
        with self._lock:
            span = self._spans.get(key)
        if span is None:
            # A whole-object read (DCP's .metadata): verified when a manifest is known.
            span = SpanRead.complete(key, 0, self.storage.read(key, record=self._record(key)))
        yield _SpanReader(span)

    def prefetch(self, path: str, start: int, end: int) -> None:
        """Start fetching ``[start, end)`` of an object (block-aligned, concurrent, verified as
        it is read) for the reads DCP is about to make; `release` drops it."""
        key = self.storage.key_of(path)
        span = self.storage.read_span(key, start, end, self._record(key))
        with self._lock:
            self._spans[key] = span

    def release(self, path: str) -> None:
        with self._lock:
            span = self._spans.pop(self.storage.key_of(path), None)
        if span is not None:
            span.cancel()  # a failed load must not leave ranged GETs running

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike[str], **kwargs: Any) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        key, new_key = (
            self.storage.key_of(os.fspath(path)),
            self.storage.key_of(os.fspath(new_path)),
        )
        self.storage.rename(key, new_key)
        with self._lock:
            if key in self._written:
                self._written[new_key] = dataclasses.replace(self._written.pop(key), key=new_key)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        self.storage.make_dirs(self.storage.key_of(os.fspath(path)))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str)

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.storage.size(self.storage.key_of(os.fspath(path))) is not None

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        key = self.storage.key_of(os.fspath(path))
        self.storage.delete(key)
        with self._lock:
            self._written.pop(key, None)

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        prefix = self.storage.key_of(os.fspath(path))
        return [self.storage.url(key) for key in self.storage.list_objects(prefix)]


class StorageWriter(FileSystemWriter):
    """DCP writer for one step directory (`path`, a URL under ``storage.root``).

    `sync_files` is off because durability comes from the storage (fsync+rename locally,
    CompleteMultipartUpload on S3); DCP's fallback for non-files is a host-wide ``os.sync()``.
    `overwrite` is off: trainctl clears an uncommitted step before saving into it and never
    saves into a committed one, so an existing ``.metadata`` here is a bug worth failing on.
    """

    def __init__(self, path: str, storage: Storage, *, thread_count: int = 1) -> None:
        super().__init__(
            path,
            single_file_per_rank=True,
            sync_files=False,
            thread_count=thread_count,
            per_thread_copy_ahead=0,  # the state dict is already staged on CPU
            overwrite=False,
        )
        # The documented seam (FsspecWriter does the same): DCP only calls FileSystemBase methods.
        self.fs = StorageFileSystem(storage)  # type: ignore[assignment]
        self.path = path

    @property
    def file_system(self) -> StorageFileSystem:
        return cast(StorageFileSystem, self.fs)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # Small items first: DCP saves a replicated item (optimizer `step` scalars, param
        # groups) once, in one rank's file, interleaved with that rank's shards. Every other
        # rank loads them, and a verified read is whole blocks, so scattered they make each
        # rank fetch nearly all of another rank's file. Together at the head of the file they
        # cost one block.
        ordered = sorted(plan.items, key=_write_size)
        # DCP serialises each tensor with torch.save, whose zip records carry a CRC-32 that
        # nothing here reads (torch.load does not check it; trainctl checksums every block of
        # the file itself): computing it cost 8 ms of CPU per 50 MB, on the thread that feeds
        # the uploads. The setting is thread-local (torch's config `patch`), so a torch.save
        # elsewhere in the process keeps its CRC; DCP's extra writer threads
        # (thread_count > 1) keep it too.
        with serialization_config.patch({"save.compute_crc32": False}):  # type: ignore[attr-defined]
            return super().write_data(dataclasses.replace(plan, items=ordered), planner)


def _write_size(item: WriteItem) -> int:
    """Bytes an item takes (0 for serialised objects: small by nature)."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    numel = 1
    for dim in item.tensor_data.size:
        numel *= dim
    return numel * item.tensor_data.properties.dtype.itemsize


class CachingSavePlanner(DefaultSavePlanner):
    """DCP's default save planner with its plan cache, under a key of our own.

    A training job saves the same state layout every time, yet DCP plans every save from
    scratch: each rank pickles its plan to the coordinator, which unpickles them all, dedups and
    scatters the result. On a small model that was most of the upload thread's Python time, and
    the upload thread shares the GIL with the training loop. With the cache, a rank whose plan
    did not change sends an empty one and the coordinator reuses the global plan (DCP's own
    `enable_plan_caching`). DCP keys the cache by class name, process-wide; `key` gives each
    Checkpointer its own entry, so two checkpointers in one process never share plans.

    With `staged`, tensors are handed to the writer only once the staging copy finished.
    """

    def __init__(self, key: str, staged: Staged | None = None) -> None:
        super().__init__(enable_plan_caching=True)
        self._cached_plans_key = key
        self._staged = staged

    def resolve_data(self, write_item: WriteItem) -> Any:
        """The item's data; a tensor's once the staging copy finished (`Staged`: the training
        thread may still be copying while the upload thread plans and writes plain values)."""
        if self._staged is not None and write_item.type != WriteItemType.BYTE_IO:
            self._staged.wait()
        return super().resolve_data(write_item)

    def has_final_plan(self) -> bool:
        """Whether this rank holds a finished plan from an earlier save under this key."""
        return self._cached_plans_key in SavePlanner._cached_final_save_plan

    @staticmethod
    def forget(key: str) -> None:
        """Drop what the cache holds for `key` (a closed Checkpointer)."""
        for cache in (
            SavePlanner._cached_save_plan,
            SavePlanner._cached_all_plans,
            SavePlanner._cached_global_plan,
            SavePlanner._cached_metadata,
            SavePlanner._cached_final_save_plan,
        ):
            cache.pop(key, None)


class StorageReader(FileSystemReader):
    """DCP reader for one step directory; verifies against `manifest` when one is given.

    Each shard file is fetched once, as the smallest block-aligned span covering the items this
    rank loads (a resharding load reads only part of other ranks' files), with concurrent ranged
    reads that all start at once; items are deserialised as their bytes arrive.
    """

    def __init__(self, path: str, storage: Storage, manifest: Manifest | None = None) -> None:
        super().__init__(path)
        self.fs = StorageFileSystem(storage, manifest)  # type: ignore[assignment]
        self.path = path

    @property
    def file_system(self) -> StorageFileSystem:
        return cast(StorageFileSystem, self.fs)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        spans: dict[str, tuple[int, int]] = {}
        items: dict[str, list[Any]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            start, end = spans.get(info.relative_path, (info.offset, info.offset + info.length))
            spans[info.relative_path] = (
                min(start, info.offset),
                max(end, info.offset + info.length),
            )
            items.setdefault(info.relative_path, []).append(item)

        fs = self.file_system
        urls = [(path, fs.concat_path(self.path, path)) for path in spans]
        # Two spans in flight at most (memory: the file being deserialised and the next one);
        # their ranged reads share the storage's concurrency first come, first served, and
        # each file's items are deserialised in offset order as their bytes arrive.
        try:
            if urls:
                fs.prefetch(urls[0][1], *spans[urls[0][0]])
            for index, (path, url) in enumerate(urls):
                if index + 1 < len(urls):
                    ahead, ahead_url = urls[index + 1]
                    fs.prefetch(ahead_url, *spans[ahead])
                ordered = sorted(
                    items[path], key=lambda i: self.storage_data[i.storage_index].offset
                )
                super().read_data(dataclasses.replace(plan, items=ordered), planner)
                fs.release(url)
        finally:
            for _, url in urls:
                fs.release(url)  # no-op for spans already released
        done: Future[None] = Future()
        done.set_result(None)
        return done


def writer_objects(writer: StorageWriter, step_url: str) -> dict[str, WrittenObject]:
    """Objects a writer produced, keyed by path relative to the step directory."""
    prefix = writer.file_system.storage.key_of(step_url)
    return {
        key[len(prefix) :].lstrip("/"): written
        for key, written in writer.file_system.written_objects().items()
    }


__all__ = [
    "CachingSavePlanner",
    "ObjectWriter",
    "StorageFileSystem",
    "StorageReader",
    "StorageWriter",
    "writer_objects",
]
