"""Typed errors for people.

A `UserError` is a mistake the user can fix: it carries where the bad value came from
(``recipes/x.yaml: checkpoint.interval_steps``), the value, and what to do. The CLI catches it
once, prints one message to stderr and exits with its exit code. Bugs stay exceptions (or
asserts) and keep their tracebacks.
"""

from __future__ import annotations

from typing import Any

from trainctl.exitcodes import ExitCode


class TrainctlError(Exception):
    """Base class of every error trainctl raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class UserError(TrainctlError):
    """Bad input: names the source, the bad value and the fix. Exit code 2, never retried."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(
        self,
        problem: str,
        *,
        where: str | None = None,
        value: Any = None,
        fix: str | None = None,
        has_value: bool | None = None,
    ) -> None:
        self.problem = problem
        self.where = where
        self.value = value
        self.fix = fix
        self.has_value = value is not None if has_value is None else has_value
        super().__init__(self.render())

    def render(self) -> str:
        """One human-readable message: `where: problem (got value). fix`."""
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.has_value:
            text += f" (got {self.value!r})"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class NotFoundError(UserError):
    """A named thing (job, checkpoint step) does not exist in the store."""


class StorageError(TrainctlError):
    """The storage backend failed (unreachable endpoint, permission). Retry may help."""

    exit_code = ExitCode.FAILED


class CorruptStoreError(TrainctlError):
    """A file in the job store cannot be read as what it should be (truncated, not JSON, a
    field of the wrong type). Its own exit code: a scheduler must not retry into it."""

    exit_code = ExitCode.STORE_CORRUPT

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(
            f"{where}: unreadable: {problem}\n  fix: restore or repair this file (or remove "
            "the job); trainctl will not guess at its contents"
        )


def first_problem(error: Any) -> str:
    """A pydantic ``ValidationError``'s first problem as ``field.path: message`` (the whole
    object's problems have no path: then the message alone)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
