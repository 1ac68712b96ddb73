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


class UserErrors(UserError):
    """Several user mistakes found at once (every validation error of a recipe): each is a
    `UserError` with its own place, value and fix; rendered as a count, then one entry per
    problem. Exit code 2."""

    def __init__(self, problems: list[UserError], *, where: str | None = None) -> None:
        if len(problems) < 2:
            raise ValueError("UserErrors holds two problems or more: raise the one alone")
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problems", where=where)

    def render(self) -> str:
        entries = [
            "  " + problem.render().replace("\n  fix:", "\n    fix:") for problem in self.problems
        ]
        return "\n".join([super().render(), *entries])


def one_or_all(problems: list[UserError], *, where: str | None = None) -> UserError:
    """The error to raise for `problems` (not empty): the one alone, else all of them."""
    if not problems:
        raise ValueError("no problems to raise")
    return problems[0] if len(problems) == 1 else UserErrors(problems, where=where)


class NotFoundError(UserError):
    """A named thing (job, checkpoint step) does not exist in the store."""


class StorageError(TrainctlError):
    """The storage backend failed (a read or write refused or lost). Retry may help.

    `problem` says what failed, `url` which storage URL (never credentials), `fix` what to do.
    The subclasses below are the failures a person must act on, each with its exit code.
    """

    exit_code = ExitCode.FAILED

    def __init__(self, problem: str, *, url: str | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.url = url
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """`url: problem` and, on a second line, the fix."""
        text = f"{self.url}: {self.problem}" if self.url else self.problem
        return f"{text}\n  fix: {self.fix}" if self.fix else text

    def __reduce__(self) -> tuple[Any, ...]:
        # DCP pickles a rank's exception to every rank: keyword arguments must survive it.
        return (_rebuild_storage_error, (type(self), self.problem, self.url, self.fix))


def _rebuild_storage_error(
    kind: type[StorageError], problem: str, url: str | None, fix: str | None
) -> StorageError:
    return kind(problem, url=url, fix=fix)


class StorageUnreachableError(StorageError):
    """The storage endpoint did not answer (refused, timed out, DNS): an outage, not a
    mistake in the input. Its own exit code: a scheduler may retry it later."""

    exit_code = ExitCode.STORAGE_UNREACHABLE


class StorageSetupError(StorageError):
    """The storage refuses us for a reason a person must fix and a retry will not: no or
    rejected credentials, access denied, a bucket that does not exist or cannot exist, a
    local root that does not exist. Exit code 2, never retried."""

    exit_code = ExitCode.BAD_INPUT


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
