"""The job store's objects over fsspec, with the guarantees the store promises.

`StoreFiles` writes an object whole or not at all and never in place: a replacement goes to a
temporary name, fsync'd, then renamed (local) or is one PUT (object stores, where a PUT is
atomic); a create-once write (events) links a complete temporary file into place (local) or is
one ``If-None-Match: *`` PUT (S3). Conditional writes (`read_tagged` / `replace_tagged`, for the
lease) compare a tag: the object's ETag on S3, a content hash under a file lock locally. Files
are created readable by whoever may read the root (the umask's say, not mkstemp's 0600).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, NoReturn

from trainctl.errors import CorruptStoreError, StorageError, StorageSetupError
from trainctl.storage_errors import DEFAULT_TIMEOUT_S, translate


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Conflict(Exception):
    """A conditional write lost: the object changed since it was read."""


def s3_options(timeout_s: float) -> dict[str, Any]:
    """s3fs options that bound how long one request may take: connect and read timeouts of
    `timeout_s`, and botocore's ``standard`` retries (3 attempts, backoff) instead of its
    legacy 5 that, with their backoff, made an unreachable endpoint a 13 s wait."""
    return {
        "config_kwargs": {
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
            "retries": {"max_attempts": 3, "mode": "standard"},
        }
    }


class StoreFiles:
    """Objects under one root (a local path or an fsspec URL).

    A failure to reach or use the storage raises a `StorageError` naming the URL and the fix
    (`trainctl.storage_errors.translate`): unreachable endpoint, missing or rejected
    credentials, access denied, missing bucket. `timeout_s` bounds each request (connect and
    read) and, in `check_root`, the first one with its retries.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.root = root
        self.local = is_local(root)
        self.timeout_s = timeout_s
        given = dict(storage_options or {})
        if not self.local:
            defaults = s3_options(timeout_s)
            given["config_kwargs"] = {
                **defaults["config_kwargs"],
                **(given.get("config_kwargs") or {}),
            }
        self._options = given
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.root, **self._options)
        return self._fs

    def check_root(self, create: bool = False) -> None:
        """Fail now, with one clear message, if the root cannot be used: a local root that is
        not a directory (unless `create`: the first write makes it), or an S3 root whose
        bucket is missing, denied, misnamed, unreachable or has no credentials to reach it.
        On S3 this is one ``ListObjectsV2`` of at most one key under the prefix (what
        read access to the root allows), given `timeout_s` in all, retries included."""
        if self.local:
            if os.path.isdir(self.root) or (create and not os.path.exists(self.root)):
                return
            problem = "is not a directory" if os.path.exists(self.root) else "does not exist"
            raise StorageSetupError(
                f"the storage root {problem}",
                url=self.root,
                fix="check --storage / $TRAINCTL_STORAGE (`trainctl launch` creates the root)",
            )
        from fsspec.asyn import sync

        bucket, _, prefix = self.root.split("://", 1)[1].partition("/")
        prefix = prefix.strip("/")
        try:
            fs = self.fs
            sync(
                fs.loop,
                fs._call_s3,
                "list_objects_v2",
                Bucket=bucket,
                Prefix=f"{prefix}/" if prefix else "",
                MaxKeys=1,
                timeout=self.timeout_s,
            )
        except Exception as exc:
            self.fail(exc, self.root, "reach")

    def fail(self, error: Exception, url: str, doing: str) -> NoReturn:
        """Raise what `error`, met while `doing` something to `url`, means: the translated
        `StorageError`, else a plain one for an OSError, else `error` itself (a bug)."""
        translated = translate(error, url, self.timeout_s)
        if translated is not None:
            raise translated from error
        if isinstance(error, OSError):
            raise StorageError(f"cannot {doing} it: {error}", url=url) from error
        raise error

    def _local_temp(self, url: str, data: bytes) -> str:
        """`data` in a new, fsync'd temporary file beside `url`, readable as a store file."""
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                # mkstemp makes the file 0600: stored files are for anyone who may read the root.
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def write_atomic(self, url: str, data: bytes) -> None:
        """Replace `url` with `data` as a whole: readers see the old or the new, never half."""
        try:
            if self.local:
                tmp = self._local_temp(url, data)
                try:
                    os.replace(tmp, url)
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            else:
                self.fs.pipe_file(url, data)  # one PUT replaces an object atomically
        except Exception as exc:
            self.fail(exc, url, "write")

    def write_once(self, url: str, data: bytes) -> None:
        """Create `url` holding `data`, whole or not at all; FileExistsError if it exists."""
        try:
            if self.local:
                tmp = self._local_temp(url, data)
                try:
                    os.link(tmp, url)  # atomic, and refuses an existing name
                finally:
                    os.unlink(tmp)
            else:
                self.fs.pipe_file(url, data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:
            self.fail(exc, url, "write")

    def read(self, url: str) -> bytes | None:
        try:
            if self.local:
                with open(url, "rb") as handle:
                    return handle.read()
            return bytes(self.fs.cat_file(url))
        except FileNotFoundError:
            return None
        except Exception as exc:
            self.fail(exc, url, "read")

    def read_many(self, urls: list[str]) -> dict[str, bytes | None]:
        """Each of `urls`' content (None where absent): on an object store in one batch of
        concurrent GETs, not one round trip after another."""
        if self.local or len(urls) < 2:
            return {url: self.read(url) for url in urls}
        try:
            found = self.fs.cat(urls, on_error="return")
        except Exception as exc:
            self.fail(exc, urls[0], "read")
        out: dict[str, bytes | None] = {}
        for url in urls:
            value = found.get(url, found.get(url.split("://", 1)[-1]))
            if isinstance(value, FileNotFoundError) or value is None:
                out[url] = None
            elif isinstance(value, Exception):
                self.fail(value, url, "read")
            else:
                out[url] = bytes(value)
        return out

    def write_many(self, pieces: dict[str, bytes]) -> None:
        """Replace each url with its data, each whole (`write_atomic`); on an object store in
        one batch of concurrent PUTs."""
        if self.local or len(pieces) < 2:
            for url, data in pieces.items():
                self.write_atomic(url, data)
            return
        try:
            self.fs.pipe(pieces)
        except Exception as exc:
            self.fail(exc, next(iter(pieces)), "write")

    def list(self, url: str) -> list[str]:
        """Names (not paths) directly under `url`; empty when it does not exist."""
        try:
            if self.local:
                return sorted(os.listdir(url))
            self.fs.invalidate_cache(url)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(url, detail=False))
        except FileNotFoundError:
            return []
        except Exception as exc:
            self.fail(exc, url, "list")

    def read_json(self, url: str) -> Any:
        """A stored JSON document (None when absent); CorruptStoreError when not JSON."""
        raw = self.read(url)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as bad:
            raise CorruptStoreError(url, f"not JSON ({bad})") from None

    # -- conditional writes (the lease) ----------------------------------------------------------
    @contextlib.contextmanager
    def _local_guard(self, url: str) -> Iterator[None]:
        """Serialise read-compare-write of `url` between processes (a local or NFS root)."""
        os.makedirs(os.path.dirname(url), exist_ok=True)
        with open(f"{url}.guard", "ab") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard.fileno(), fcntl.LOCK_UN)

    def read_tagged(self, url: str) -> tuple[bytes, str] | None:
        """`url`'s content and a tag that changes whenever it does (S3: its ETag)."""
        if self.local:
            raw = self.read(url)
            return None if raw is None else (raw, hashlib.sha256(raw).hexdigest())
        try:
            self.fs.invalidate_cache(url)
            tag = str(self.fs.info(url)["ETag"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            self.fail(exc, url, "read")
        raw = self.read(url)
        return None if raw is None else (raw, tag)

    def replace_tagged(self, url: str, data: bytes, tag: str | None) -> str:
        """Write `data` to `url` if it still has `tag` (None: if it does not exist); returns the
        new tag. Raises `Conflict` when another writer got there first."""
        if self.local:
            with self._local_guard(url):
                current = self.read_tagged(url)
                if (current[1] if current else None) != tag:
                    raise Conflict(url)
                self.write_atomic(url, data)
            return hashlib.sha256(data).hexdigest()
        try:
            if tag is None:
                out = self.fs.pipe_file(url, data, mode="create")
            else:
                out = self.fs.pipe_file(url, data, IfMatch=tag)
        except FileExistsError:
            raise Conflict(url) from None
        except OSError as exc:
            if exc.errno == errno.EINVAL or "Precondition" in str(exc):
                raise Conflict(url) from None
            self.fail(exc, url, "write")
        except Exception as exc:
            self.fail(exc, url, "write")
        self.fs.invalidate_cache(url)
        return str((out or {}).get("ETag") or self.read_tagged(url) or "")


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    return 0o022


def current_umask() -> int:
    """This process's umask (cached): files trainctl writes for others to read get
    ``0o666 & ~current_umask()``, as `open` would give them."""
    return _umask()
