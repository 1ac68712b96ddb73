"""Secrets stay where the user put them: recognised here, kept out of everything trainctl writes.

A recipe holds secrets in two places: the ``secrets:`` section (and ``env:`` entries whose
names look like credentials, `is_secret_name`, which the spec moves there), and credentials in
``checkpoint.storage_options`` (`key`, `secret`, `token`, ... at any depth). None of them is
ever stored in the job store, printed, logged, or put in a TRAINCTL_* variable:

- the stored spec and every printed spec (dry run, status) carry `REDACTED` in their place;
- the controller writes the values to a 0600 file in a 0700 directory of the run directory
  (`JobSecrets.write`) for the job's lifetime and removes it when it ends; workers get its
  path (``TRAINCTL_SECRETS_FILE``) and load the values into their own process only
  (`apply_worker_secrets`): the shim or zygote that becomes the worker, and the runtime for
  the checkpoint storage credentials;
- a `Redactor` scrubs the values from anything the controller records (events, state reasons),
  in case an error message quoted one.

`trainctl resume` gets the values back from the recipe file the job was launched with (its
path is in the stored spec), where the user put them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the shim ~10 ms
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

REDACTED = "***"
"""What a secret value is replaced with wherever it would appear."""

SECRET_WORDS = frozenset(
    {"secret", "token", "password", "passwd", "credential", "credentials", "apikey", "auth"}
)
"""A name holding one of these words (split at ``_``, ``-``, ``.``) names a credential."""
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
"""...or one of these pairs of consecutive words (``WANDB_API_KEY``, ``AWS_ACCESS_KEY_ID``)."""
SECRET_OPTIONS = frozenset({"key", "secret", "token", "password", "session_token", "sas_token"})
"""fsspec/s3fs option names that are credentials (``key``/``secret`` alone say little)."""


def is_secret_name(name: str) -> bool:
    """Whether a variable or option called `name` holds a credential (``HF_TOKEN`` does,
    ``TOKENIZERS_PARALLELISM`` does not)."""
    if name.lower() in SECRET_OPTIONS:
        return True
    words = [w for w in re.split(r"[_.\-]", name.lower()) if w]
    return bool(SECRET_WORDS.intersection(words)) or any(
        pair in SECRET_PAIRS for pair in itertools.pairwise(words)
    )


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public, secret) halves of storage options, nested mappings split alike."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if is_secret_name(name) and not isinstance(value, Mapping):
            secret[name] = value
        elif isinstance(value, Mapping):
            inner_public, inner_secret = split_options(value)
            public[name] = inner_public
            if inner_secret:
                secret[name] = inner_secret
        else:
            public[name] = value
    return public, secret


def merge_options(public: Mapping[str, Any], secret: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `split_options`."""
    merged = dict(public)
    for name, value in secret.items():
        if isinstance(value, Mapping):
            merged[name] = merge_options(merged.get(name) or {}, value)
        else:
            merged[name] = value
    return merged


def redact(value: Any) -> Any:
    """`value` with every secret-named entry of every mapping in it replaced by `REDACTED`."""
    if isinstance(value, Mapping):
        return {
            name: REDACTED
            if is_secret_name(str(name)) and not isinstance(item, Mapping) and item is not None
            else redact(item)
            for name, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value


def without_redacted(value: Any) -> Any:
    """`value` with every entry whose value is `REDACTED` left out (a stored spec's options,
    before use: the credentials then come from the standard chain)."""
    if isinstance(value, Mapping):
        return {k: without_redacted(v) for k, v in value.items() if v != REDACTED}
    return value


class JobSecrets:
    """A job's secret values: worker environment and checkpoint storage credentials.

    (A plain class, not a dataclass: the worker shim imports this module on every worker
    start, and `dataclasses` costs it milliseconds.)
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.env: dict[str, str] = dict(env or {})
        self.storage_options: dict[str, Any] = dict(storage_options or {})

    def __repr__(self) -> str:  # never the values
        return f"JobSecrets(env={sorted(self.env)}, storage_options=...)"

    def __bool__(self) -> bool:
        return bool(self.env or self.storage_options)

    def values(self) -> list[str]:
        """Every secret string, longest first (so a scrub replaces whole values first)."""
        found = [v for v in self.env.values() if v]

        def walk(options: Mapping[str, Any]) -> None:
            for value in options.values():
                if isinstance(value, Mapping):
                    walk(value)
                elif value is not None and str(value):
                    found.append(str(value))

        walk(self.storage_options)
        return sorted({v for v in found if v != REDACTED}, key=len, reverse=True)

    def write(self, path: Path) -> None:
        """Write the values to `path`, readable by this user only (its directory too)."""
        write_private(path, json.dumps({"env": self.env, "storage_options": self.storage_options}))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> JobSecrets:
        """The values `write` stored; empty when the file is gone or unreadable."""
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return cls()
        env = data.get("env") if isinstance(data, dict) else None
        options = data.get("storage_options") if isinstance(data, dict) else None
        return cls({str(k): str(v) for k, v in (env or {}).items()}, options)

    @staticmethod
    def remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def write_private(path: Path, text: str) -> None:
    """`text` in `path`, readable by this user only (its directory too), replaced whole."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def read_private(path: str) -> str:
    """What `write_private` stored at `path` ("" when there is no path or no file)."""
    if not path:
        return ""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def apply_worker_secrets(environ: dict[str, str] | os._Environ[str]) -> None:
    """In a worker, before its script runs: add the job's secret variables (from the file
    ``TRAINCTL_SECRETS_FILE`` names) to `environ`. A no-op without one."""
    from trainctl.env import Env

    path = environ.get(Env.SECRETS_FILE)
    if path:
        environ.update(JobSecrets.read(path).env)


class Redactor:
    """Replaces known secret values with `REDACTED` in text and in JSON-like data."""

    def __init__(self, values: list[str]) -> None:
        # A value of a character or two would turn ordinary text into stars: skip those.
        self._values = [v for v in values if len(v) >= 4]

    def __bool__(self) -> bool:
        return bool(self._values)

    def text(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def data(self, value: Any) -> Any:
        if not self._values:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value
