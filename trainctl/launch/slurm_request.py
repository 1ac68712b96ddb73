"""What a job asks Slurm for: the `slurm:` section's values, checked as sbatch reads them.

`SlurmOptions` is the request as the renderer takes it (built from the recipe's ``slurm:``
section and `launch`'s flags in one place, `trainctl.cli.slurm_launch.slurm_options`);
`request_directives` turns it into sbatch options. The checks here are pure and shared: the
recipe's `SlurmSpec` runs them as pydantic validators (so a bad value comes out as one
`UserError` naming the file and ``slurm.<field>``), and `render_sbatch` runs them again on the
options it is given. Each raises `SlurmValueError` with the problem and the fix.

Every check accepts a subset of what sbatch 22.05 accepts (tests/slurm compares them with the
real sbatch), so a value that passes here is never refused for its syntax at submission;
whether the cluster can *satisfy* it (enough GPUs, an existing reservation) only Slurm knows:
`trainctl launch` asks it with ``sbatch --test-only`` before storing anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal

JOB_NAME_MAX_BYTES = 1024
"""slurmctld refuses longer job names ("Pathname ... too long")."""
SIGNAL_GRACE_MAX_S = 65535
"""The largest `--signal=...@TIME` sbatch accepts."""
DEFAULT_SIGNAL_GRACE_S = 120

GpuRequest = Literal["gpus-per-node", "gres"]
GPU_REQUESTS: tuple[GpuRequest, ...] = ("gpus-per-node", "gres")

PARTITION_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")
"""Accounts, QOS, GPU types: one name (Slurm splits lists at `,` and GRES at `:`)."""
NAME_LIST_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
"""Reservations: one name or a comma-separated list."""
CONSTRAINT_PATTERN = re.compile(r"[A-Za-z0-9_.&|*()\[\],:-]+")
"""Node features combined with `&` (and), `|` (or), `*N` (count), `[...]` and `(...)`."""
MEM_PATTERN = re.compile(r"\d+(?:[KMGT]B?)?", re.IGNORECASE)
"""`--mem`: a whole number of megabytes, or with a K, M, G or T suffix; 0: all of it."""
TIME_LIMIT_PATTERN = re.compile(
    r"\d+(:\d+){0,2}"  # minutes | minutes:seconds | hours:minutes:seconds
    r"|\d+-\d+(:\d+){0,2}"  # days-hours | days-hours:minutes | days-hours:minutes:seconds
    r"|UNLIMITED|INFINITE",
    re.IGNORECASE,
)
OPTION_NAME_PATTERN = re.compile(r"--[A-Za-z][A-Za-z0-9-]*")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

OWNED_SBATCH_OPTIONS = (
    "--job-name",
    "--nodes",
    "--ntasks",
    "--ntasks-per-node",
    "--requeue",
    "--no-requeue",
    "--open-mode",
    "--signal",
    "--exclude",
    "--nodelist",
    "--chdir",
    "--output",
    "--error",
    "--parsable",
    "--wrap",
    "--array",
    "--test-only",
)
"""sbatch options trainctl sets itself (or that would break requeue and exclusion)."""

FIELD_OPTIONS = {
    "--partition": "partition",
    "--time": "time_limit",
    "--gpus-per-node": "gpus_per_node",
    "--account": "account",
    "--qos": "qos",
    "--constraint": "constraint",
    "--reservation": "reservation",
    "--exclusive": "exclusive",
    "--mem": "mem",
    "--cpus-per-task": "cpus_per_task",
}
"""sbatch options the `slurm:` section has a field for: in `extra_args` they are refused,
with a fix naming the field."""

EXACT_PREFIXES = ("--gpus", "--gres")
"""Real sbatch options that are also prefixes of others (`--gpus` of `--gpus-per-node`): an
exact match, never an abbreviation."""


class SlurmValueError(ValueError):
    """A value sbatch would refuse or read differently. A ValueError, so that pydantic reports
    it at the field's path; `problem` and `fix` become the `UserError`'s."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    """How a job asks Slurm for its allocation: the renderer's copy of `spec.SlurmSpec`
    (whose docstrings say what each field means and its default)."""

    partition: str | None = None
    time_limit: str | None = None
    gpus_per_node: int = 0
    gpu_type: str | None = None
    gpu_request: GpuRequest = "gpus-per-node"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    exclusive: bool = False
    mem: str | None = None
    cpus_per_task: int | None = None
    signal_grace_s: int = DEFAULT_SIGNAL_GRACE_S
    extra_args: tuple[str, ...] = ()


# -- checks, one per field ----------------------------------------------------------------------


def check_partition(value: str) -> str:
    if not PARTITION_PATTERN.fullmatch(value):
        raise SlurmValueError(
            "not a Slurm partition name (or comma-separated list of them)",
            "`sinfo -s` lists the partitions",
        )
    return value


def check_time_limit(value: str) -> str:
    if not TIME_LIMIT_PATTERN.fullmatch(value):
        raise SlurmValueError(
            "not a time limit sbatch accepts",
            "use MINUTES, HH:MM:SS, DAYS-HH, DAYS-HH:MM:SS or UNLIMITED (e.g. 04:00:00)",
        )
    return value


def check_name(value: str, what: str, *, lists: bool = False) -> str:
    pattern = NAME_LIST_PATTERN if lists else NAME_PATTERN
    if not pattern.fullmatch(value):
        plural = " (or a comma-separated list)" if lists else ""
        raise SlurmValueError(
            f"not a Slurm {what} name{plural}",
            "names are letters, digits and '_', '.', '+', '-'",
        )
    return value


def check_constraint(value: str) -> str:
    if not CONSTRAINT_PATTERN.fullmatch(value):
        raise SlurmValueError(
            "not a node feature expression",
            "combine features with & (and), | (or), e.g. `h100&ib` or `[rack1|rack2]`",
        )
    return value


def check_mem(value: str) -> str:
    if not MEM_PATTERN.fullmatch(value):
        raise SlurmValueError(
            "not an sbatch memory size",
            "a whole number with an optional K, M, G or T suffix (e.g. 500G); 0: all of it",
        )
    return value


def check_count(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SlurmValueError(f"{what} must be a whole number >= {minimum}", f"e.g. {minimum + 1}")
    return value


def check_gpu_type(value: str | None, gpus_per_node: int) -> str | None:
    if value is None:
        return value
    check_name(value, "GPU type")
    if gpus_per_node == 0:
        raise SlurmValueError(
            "a GPU type is set but no GPUs are asked for",
            "set slurm.gpus_per_node too (or drop gpu_type)",
        )
    return value


def check_gpu_request(value: str) -> str:
    if value not in GPU_REQUESTS:
        raise SlurmValueError(
            "unknown way to ask for GPUs",
            "gpus-per-node (--gpus-per-node=[type:]N) or gres (--gres=gpu[:type]:N)",
        )
    return value


def check_signal_grace(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise SlurmValueError(
            f"the preemption signal's grace must be whole seconds in 1..{SIGNAL_GRACE_MAX_S}",
            "leave time to commit a checkpoint, e.g. 120",
        )
    return value


def check_extra_arg(arg: str, renders_gres: bool) -> str:
    """One item of `extra_args`: a long option (`--name` or `--name=value`) that neither
    trainctl nor another field of the section sets. `renders_gres`: the section already
    writes a `--gres` line (GPUs in the gres form)."""
    name, _, _ = arg.partition("=")
    if not OPTION_NAME_PATTERN.fullmatch(name):
        raise SlurmValueError(
            "extra sbatch options must be long options, one per item",
            "write `--comment=two words` or `--hold`, not `-A ml` or `--comment two words`",
        )
    if CONTROL_CHARACTERS.search(arg):
        raise SlurmValueError("an sbatch option holds a control character", "use one line")
    owned = _matching(name, OWNED_SBATCH_OPTIONS)
    if owned:
        raise SlurmValueError(
            f"trainctl sets {owned} itself",
            "use trainctl's own settings (--nodes, the job store) instead",
        )
    field = _matching(name, tuple(FIELD_OPTIONS))
    if field:
        raise SlurmValueError(
            f"the slurm: section has a field for {field}",
            f"set slurm.{FIELD_OPTIONS[field]} (or its `trainctl launch` flag) instead",
        )
    if name == "--gres" and ("gpu" in arg.partition("=")[2] or renders_gres):
        raise SlurmValueError(
            "GPUs are asked for with the slurm: section's own fields",
            "set slurm.gpus_per_node, gpu_type and gpu_request: gres; other GRES go in "
            "one --gres item only when the section asks for no GPUs in the gres form",
        )
    return arg


def _matching(name: str, options: tuple[str, ...]) -> str | None:
    """The option of `options` that `name` is, or abbreviates (sbatch accepts any
    unambiguous prefix: `--requ` is `--requeue`)."""
    if name in options:
        return name
    if name in EXACT_PREFIXES:
        return None
    return next((option for option in options if option.startswith(name)), None)


def check_options(options: SlurmOptions) -> list[tuple[str, SlurmValueError]]:
    """Every problem of `options`, as (field path, error); empty when sbatch takes them."""
    problems: list[tuple[str, SlurmValueError]] = []

    def check(field: str, checker: Callable[..., object], *args: object) -> None:
        try:
            checker(*args)
        except SlurmValueError as error:
            problems.append((f"slurm.{field}", error))

    optional: list[tuple[str, str | None, Callable[[str], object]]] = [
        ("partition", options.partition, check_partition),
        ("time_limit", options.time_limit, check_time_limit),
        ("account", options.account, lambda value: check_name(value, "account")),
        ("qos", options.qos, lambda value: check_name(value, "QOS")),
        ("constraint", options.constraint, check_constraint),
        ("reservation", options.reservation, lambda v: check_name(v, "reservation", lists=True)),
        ("mem", options.mem, check_mem),
    ]
    for field, value, checker in optional:
        if value is not None:
            check(field, checker, value)
    check("gpus_per_node", check_count, options.gpus_per_node, "gpus_per_node", 0)
    check("gpu_type", check_gpu_type, options.gpu_type, options.gpus_per_node)
    check("gpu_request", check_gpu_request, options.gpu_request)
    if options.cpus_per_task is not None:
        check("cpus_per_task", check_count, options.cpus_per_task, "cpus_per_task", 1)
    check("signal_grace_s", check_signal_grace, options.signal_grace_s)
    gres = options.gpu_request == "gres" and options.gpus_per_node > 0
    for index, arg in enumerate(options.extra_args):
        check(f"extra_args[{index}]", check_extra_arg, arg, gres)
    return problems


# -- rendering -----------------------------------------------------------------------------------


def gpu_directive(options: SlurmOptions) -> tuple[str, str] | None:
    """`--gpus-per-node=[type:]N` or `--gres=gpu[:type]:N`; None when no GPU is asked for."""
    if options.gpus_per_node == 0:
        return None
    typed = f"{options.gpu_type}:" if options.gpu_type else ""
    if options.gpu_request == "gres":
        return "--gres", f"gpu:{typed}{options.gpus_per_node}"
    return "--gpus-per-node", f"{typed}{options.gpus_per_node}"


def request_directives(options: SlurmOptions) -> list[tuple[str, str | None]]:
    """The sbatch options of the request, in a fixed order (`None`: a flag without value);
    `extra_args` last, as given."""
    named: list[tuple[str, str | None]] = [
        (option, value)
        for option, value in (
            ("--partition", options.partition),
            ("--time", options.time_limit),
            ("--account", options.account),
            ("--qos", options.qos),
            ("--reservation", options.reservation),
            ("--constraint", options.constraint),
        )
        if value is not None
    ]
    gpus = gpu_directive(options)
    if gpus is not None:
        named.append(gpus)
    if options.exclusive:
        named.append(("--exclusive", None))
    if options.mem is not None:
        named.append(("--mem", options.mem))
    if options.cpus_per_task is not None:
        named.append(("--cpus-per-task", str(options.cpus_per_task)))
    for arg in options.extra_args:
        option, equals, value = arg.partition("=")
        named.append((option, value if equals else None))
    return named
