"""Pure rendering of the sbatch batch script that runs one trainctl job on Slurm.

`render_sbatch` turns a job and its Slurm options into an `SbatchScript`: the script text and
the exact sbatch argv (``--dry-run`` prints both; nothing here touches Slurm, processes or the
clock). The script is the same on the first run and on every requeue: it runs
``python -m trainctl.cli.main resume JOB --storage ROOT`` on the batch host (the allocation's
first node); `trainctl resume` starts a job that never ran and resumes one that did, from its
newest committed checkpoint, and starts one node agent per node with ``srun``.

Values reach two parsers, and each gets its own quoting:

- ``#SBATCH`` lines are read by sbatch, not by a shell: its parser takes ``"..."`` with ``\\``
  escaping the next character (also inside single quotes, unlike a shell), never expands ``$``,
  and ends an unquoted value at ``#``. Values are written bare when they are plainly safe,
  else double-quoted with ``\\`` and ``"`` escaped (checked against sbatch 22.05 in
  tests/slurm). A directive is one line, so control characters are refused.
- the shell part gets `shlex.quote`, so spaces, quotes, ``$(...)``, backticks and newlines
  arrive verbatim and nothing is executed.

Validation raises `UserError` for what sbatch would refuse (or silently change): a job name
over 1024 bytes, a ``%`` or ``\\`` the output path would turn into a filename pattern, and
every value of the request (`trainctl.launch.slurm_request`, named ``slurm.<field>``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence

from trainctl.errors import UserError
from trainctl.launch.slurm_request import (
    CONTROL_CHARACTERS,
    JOB_NAME_MAX_BYTES,
    SlurmOptions,
    check_options,
    request_directives,
)

__all__ = ["SbatchScript", "SlurmOptions", "render_sbatch"]

RESUME_MODULE = ("-m", "trainctl.cli.main", "resume")
"""The batch script runs `python -m trainctl.cli.main resume JOB --storage ROOT`."""

NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BARE_DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


@dataclasses.dataclass(frozen=True)
class SbatchScript:
    """A rendered batch script and the exact command that submits it."""

    text: str
    """The batch script (`#SBATCH` lines, then the shell part)."""
    script_path: str
    """Where the script is written before submission (kept for on-call to read)."""
    argv: tuple[str, ...]
    """The sbatch command line: `sbatch --parsable SCRIPT_PATH` (prints the Slurm job id)."""

    def describe(self) -> str:
        """The dry-run view: the command line, then the script as it will be written."""
        return f"$ {shlex.join(self.argv)}\n--- {self.script_path}\n{self.text}"


def render_sbatch(
    job_id: str,
    job_name: str,
    nodes: int,
    options: SlurmOptions,
    *,
    exclude: Sequence[str],
    python: str,
    storage_root: str,
    workdir: str,
    log_path: str,
    env: Mapping[str, str],
    script_path: str | None = None,
) -> SbatchScript:
    """Render the batch script for `job_id` on `nodes` nodes, avoiding the `exclude` nodes.

    `python` is the interpreter (with trainctl installed) on the compute nodes; `storage_root`
    the job store every node reaches; `workdir` the job's working directory (`--chdir`);
    `log_path` the batch output, appended to across requeues; `env` exported before the
    command. `script_path` defaults to `batch.sbatch` beside the log. Every path must be
    absolute (the script runs on another host, in another directory); the storage root may
    be a URL. Raises `UserError` for a value sbatch would refuse or alter.
    """
    _check_job_name(job_name)
    _check_options(options)
    if nodes < 1:
        raise UserError("a job needs at least one node", where="--nodes", value=nodes)
    for name in exclude:
        if not NODE_NAME_PATTERN.fullmatch(name):
            raise UserError(
                "not a Slurm node name",
                where="the job's excluded nodes (blocklist)",
                value=name,
                fix="node names are letters, digits, '_', '.' and '-'",
            )
    for label, path in (("python", python), ("workdir", workdir), ("log path", log_path)):
        _check_absolute(label, path)
    if "://" not in storage_root:
        _check_absolute("storage root", storage_root)
    _check_output_path(log_path)
    for name, value in env.items():
        _check_env(name, value)
    if script_path is None:
        script_path = f"{log_path.rsplit('/', 1)[0]}/batch.sbatch"
    _check_absolute("script path", script_path)

    directives = [
        ("--job-name", job_name),
        ("--nodes", str(nodes)),
        ("--ntasks-per-node", "1"),
        ("--requeue", None),
        ("--open-mode", "append"),
        ("--signal", f"B:USR1@{options.signal_grace_s}"),
    ]
    if exclude:
        directives.append(("--exclude", ",".join(sorted(set(exclude)))))
    directives += [("--chdir", workdir), ("--output", log_path.replace("%", "%%"))]
    directives += request_directives(options)

    lines = ["#!/bin/bash"]
    lines += [_directive(option, value) for option, value in directives]
    lines += [
        "#",
        f"# trainctl job {job_id}.",
        "# Slurm runs this script on the first node of the allocation, on the first run and",
        "# after every requeue, and it does the same each time:",
        "# `trainctl resume` starts the job if it never ran, else resumes it from its newest",
        "# committed checkpoint, and starts one node agent per node with srun. `exec` makes",
        "# trainctl the batch process itself, so the USR1 of --signal=B:... reaches it.",
        "set -euo pipefail",
    ]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines += [
        'echo "trainctl: batch script on ${SLURMD_NODENAME:-?}, Slurm job ${SLURM_JOB_ID:-?},'
        ' restart ${SLURM_RESTART_COUNT:-0}" >&2',
        shlex.join(("exec", python, *RESUME_MODULE, job_id, "--storage", storage_root)),
    ]
    return SbatchScript(
        text="\n".join(lines) + "\n",
        script_path=script_path,
        argv=("sbatch", "--parsable", script_path),
    )


def _directive(option: str, value: str | None) -> str:
    if value is None:
        return f"#SBATCH {option}"
    return f"#SBATCH {option}={_directive_value(value)}"


def _directive_value(value: str) -> str:
    """`value` as sbatch's `#SBATCH` parser will read it back, verbatim."""
    if BARE_DIRECTIVE_VALUE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_job_name(job_name: str) -> None:
    if not job_name:
        raise UserError("the Slurm job name is empty", where="job name", value=job_name)
    if CONTROL_CHARACTERS.search(job_name):
        raise UserError(
            "the Slurm job name holds a control character (newline, tab, ...)",
            where="job name",
            value=job_name,
            fix="use printable characters only",
        )
    if len(job_name.encode()) > JOB_NAME_MAX_BYTES:
        raise UserError(
            f"the Slurm job name is longer than {JOB_NAME_MAX_BYTES} bytes",
            where="job name",
            value=f"{job_name[:40]}... ({len(job_name.encode())} bytes)",
            fix="shorten the name",
        )


def _check_options(options: SlurmOptions) -> None:
    problems = check_options(options)
    if problems:
        where, error = problems[0]
        raise UserError(
            error.problem, where=where, value=_field_value(options, where), fix=error.fix
        )


def _field_value(options: SlurmOptions, where: str) -> object:
    field, _, index = where.removeprefix("slurm.").partition("[")
    value = getattr(options, field)
    return value[int(index.rstrip("]"))] if index else value


def _check_absolute(label: str, path: str) -> None:
    if not path.startswith("/"):
        raise UserError(
            f"the {label} must be an absolute path: the batch script runs on another host",
            where=label,
            value=path,
            fix="pass an absolute path",
        )
    if CONTROL_CHARACTERS.search(path):
        raise UserError(f"the {label} holds a control character", where=label, value=path)


def _check_output_path(log_path: str) -> None:
    # Slurm reads `\` in an output path as "no filename patterns" and drops it.
    if "\\" in log_path:
        raise UserError(
            "Slurm would not keep a backslash in the output path",
            where="log path",
            value=log_path,
            fix="choose a storage root without backslashes",
        )


def _check_env(name: str, value: str) -> None:
    if not ENV_NAME_PATTERN.fullmatch(name):
        raise UserError(
            "not an environment variable name",
            where="env",
            value=name,
            fix="names are letters, digits and '_', not starting with a digit",
        )
    if "\0" in value:
        raise UserError("an environment value holds a NUL byte", where=f"env {name}")
