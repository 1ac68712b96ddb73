"""Loading recipes: YAML (or a plain script and flags) -> a validated `JobSpec`, or one error.

Every problem becomes a `UserError` naming the file, the field path, the bad value and the fix,
so nothing starts on bad input. A value that could be a secret is never quoted back (`redact`).
The stored spec (``spec.yaml`` in the job store) is the redacted spec; `restore_secrets` gets
the secret values back from the recipe the job was launched with.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainctl.errors import CorruptStoreError, UserError, one_or_all
from trainctl.secrets import (
    REDACTED,
    JobSecrets,
    is_secret_name,
    redact,
    split_options,
    without_redacted,
)
from trainctl.spec import FAULT_KINDS, CheckpointSpec, FaultSpec, JobSpec, SlurmSpec

_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model for model in (JobSpec, CheckpointSpec, SlurmSpec)
}
"""The models a recipe (or part of one) is validated as, by name (`ValidationError.title`)."""


def parse_fault(text: str, where: str = "--fault") -> FaultSpec:
    """Parse `KIND[:NODE]@step=N[,for=S]`, e.g. ``kill-node:node-1@step=7``."""
    match = re.fullmatch(
        r"(?P<kind>[a-z-]+)(?::(?P<node>node-[0-9]+))?@step=(?P<step>[0-9]+)"
        r"(?:,for=(?P<for>[0-9.]+)s?)?",
        text.strip(),
    )
    fix = (
        "write KIND[:NODE]@step=N, e.g. kill-node:node-1@step=7 or storage-outage@step=5,for=10; "
        f"kinds: {', '.join(FAULT_KINDS)}"
    )
    if match is None:
        raise UserError("cannot parse the fault", where=where, value=text, fix=fix)
    kind = match["kind"]
    if kind not in FAULT_KINDS:
        raise UserError("unknown fault kind", where=where, value=text, fix=fix)
    node = match["node"]
    if kind != "storage-outage" and node is None:
        raise UserError(
            f"a {kind} fault needs a node", where=where, value=text, fix=f"write {kind}:node-1@..."
        )
    if int(match["step"]) < 0:
        raise UserError("the step must be >= 0", where=where, value=text, fix=fix)
    return FaultSpec(
        kind=kind,
        node=node,
        step=int(match["step"]),
        duration_s=float(match["for"]) if match["for"] else 10.0,
    )


def _field_path(loc: tuple[Any, ...]) -> str:
    """`slurm.extra_args[1]`: names joined with dots, list indexes in brackets."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "<top level>"


def _explained(error: Any) -> Any:
    """The exception a validator raised when it says what is wrong and how to fix it
    (`SlurmValueError`: ``problem`` and ``fix``), else None."""
    raised = (error.get("ctx") or {}).get("error")
    return raised if hasattr(raised, "problem") and hasattr(raised, "fix") else None


def _message(error: Any) -> str:
    """pydantic's message without its "Value error, " prefix (our validators' own words)."""
    return (
        str(error.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    )


_KIND_WORDS = {
    "missing": "required field missing",
    "extra_forbidden": "unknown field",
}
_WRONG_TYPE = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping (`key: value` lines)",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a section (`key: value` lines)",
    "model_attributes_type": "a section (`key: value` lines)",
}
"""What each kind of pydantic type error wanted, in our words (pydantic's are a fallback)."""

_RANGE_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field's annotation holds (``CheckpointSpec``, ``tuple[FaultSpec, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at field path `loc` under `model` (list indexes skipped), else None."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part)) if current else None
        current = _model_in(field.annotation) if field else None
    return current


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of `model` as a dotted path, nested sections included."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        inner = _model_in(field.annotation)
        if inner is not None and inner is not model:
            paths.extend(_field_paths(inner, f"{path}."))
    return paths


def _did_you_mean(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """For an unknown field at `loc`: a field of that very name in another section (top-level
    ``interval_steps`` -> ``checkpoint.interval_steps``), else the closest field name in its
    own section, else the closest dotted path of all."""
    name = str(loc[-1])
    every = _field_paths(model)
    elsewhere = [path for path in every if path.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return elsewhere[0]
    section = _model_at(model, loc[:-1])
    if section is not None:
        close = difflib.get_close_matches(name, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return (_field_path(loc[:-1]) + "." if loc[:-1] else "") + close[0]
    close = difflib.get_close_matches(name, every, n=1, cutoff=0.8)
    return close[0] if close else None


def _bounds(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """A field's allowed range in words (``from 0 to 4294967295``), from its declaration."""
    section = _model_at(model, loc[:-1])
    field = section.model_fields.get(str(loc[-1])) if section and loc else None
    if field is None:
        return None
    low: tuple[str, Any] | None = None
    high: tuple[str, Any] | None = None
    for rule in field.metadata:
        for attribute, sign in (("ge", ">="), ("gt", ">")):
            if getattr(rule, attribute, None) is not None:
                low = (sign, getattr(rule, attribute))
        for attribute, sign in (("le", "<="), ("lt", "<")):
            if getattr(rule, attribute, None) is not None:
                high = (sign, getattr(rule, attribute))
    if low and high and low[0] == ">=" and high[0] == "<=":
        return f"from {low[1]} to {high[1]}"
    parts = [f"{bound[0]} {bound[1]}" for bound in (low, high) if bound is not None]
    return " and ".join(parts) or None


def _problem(error: Any, model: type[BaseModel], source: str) -> UserError:
    """One pydantic error as a `UserError`: file, field path, value (secrets redacted), fix."""
    loc = tuple(error.get("loc", ()))
    kind = str(error.get("type", ""))
    explained = _explained(error)
    fix: str | None = None
    if explained is not None:
        problem, fix = str(explained.problem), str(explained.fix)
    elif kind in _RANGE_KINDS:
        allowed = _bounds(model, loc)
        problem = "out of range"
        fix = f"use a value {allowed}" if allowed else _message(error)
    elif kind == "extra_forbidden":
        problem = _KIND_WORDS[kind]
        suggestion = _did_you_mean(model, loc)
        fix = (
            f"did you mean `{suggestion}`?"
            if suggestion
            else "remove it or check its spelling (the recipe reference in README.md lists "
            "the fields)"
        )
    elif kind in _WRONG_TYPE:
        problem = f"not {_WRONG_TYPE[kind]}"
        fix = f"use a value of the right type: {_WRONG_TYPE[kind]}"
    elif kind == "missing":
        problem, fix = _KIND_WORDS[kind], "add the field"
    elif kind == "literal_error":
        allowed = (error.get("ctx") or {}).get("expected", "an allowed value")
        problem, fix = f"not one of {allowed}", f"use {allowed}"
    else:
        problem = _message(error) or "invalid value"
    # A section-level error's input is the whole section (secrets and all): not worth quoting.
    has_value = kind != "missing" and bool(loc)
    where = f"{source}: {_field_path(loc)}" if loc else source
    return UserError(
        problem,
        where=where,
        value=_shown(error) if has_value else None,
        has_value=has_value,
        fix=fix,
    )


def _shown(error: Any) -> Any:
    """The bad value, fit to quote: secret values redacted."""
    loc = [str(part) for part in error.get("loc", ())]
    if "secrets" in loc[:-1] or (loc and is_secret_name(loc[-1])):
        return REDACTED
    return redact(error.get("input"))


def validation_problems(
    error: ValidationError, source: str, model: type[BaseModel] | None = None
) -> list[UserError]:
    """Every problem pydantic found, each naming file, field, value and fix, in our words.

    `model`: the model that was validated (default: the one `error` names), for "did you mean"
    and allowed ranges."""
    root = model or _MODELS.get(error.title, JobSpec)
    return [_problem(each, root, source) for each in error.errors()]


def validation_to_user_error(
    error: ValidationError, source: str, model: type[BaseModel] | None = None
) -> UserError:
    """All of pydantic's problems as one error to raise: the one alone, else every one."""
    return one_or_all(validation_problems(error, source, model), where=source)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(
            "recipe file not found", where=str(path), fix="check the path to the recipe"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read recipe: {exc.strerror}", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(
            f"malformed YAML: {problem}", where=where, fix="fix the YAML syntax at that line"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            "a recipe must be a YAML mapping",
            where=str(path),
            value=type(data).__name__,
            fix="write `key: value` fields at the top level",
        )
    return data


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load and validate a recipe, applying command-line overrides (None values are ignored).

    The script path is resolved relative to the recipe's directory and must exist.
    Raises UserError on any problem; never starts anything.
    """
    recipe = Path(path)
    data = _read_yaml(recipe)
    data.setdefault("name", recipe.stem)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    source = str(path)
    data.setdefault("source", str(recipe.resolve()))
    script = data.get("script")
    if isinstance(script, str):
        script_path = Path(script)
        if not script_path.is_absolute():
            script_path = (recipe.parent / script_path).resolve()
        if not script_path.is_file():
            raise UserError(
                "training script not found",
                where=f"{source}: script",
                value=script,
                fix=f"create {script_path} or fix the path (relative to the recipe's directory)",
            )
        data["script"] = str(script_path)
    if "args" in data and isinstance(data["args"], list):
        data["args"] = tuple(str(arg) for arg in data["args"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, source) from None


def script_spec(
    script: str,
    args: list[str],
    overrides: dict[str, Any] | None = None,
) -> JobSpec:
    """Build a JobSpec for an unmodified torchrun script (no recipe, no trainctl imports)."""
    script_path = Path(script)
    if not script_path.is_file():
        raise UserError(
            "training script not found", where="SCRIPT", value=script, fix="check the path"
        )
    data: dict[str, Any] = {
        "name": script_path.stem,
        "script": str(script_path.resolve()),
        "args": tuple(args),
        "uses_runtime": False,
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, "command line") from None


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec as YAML, as stored in the job store (reloadable by `spec_from_yaml`), with
    every secret value replaced by ``***``."""
    data = spec.redacted().model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def spec_from_yaml(text: str, source: str) -> JobSpec:
    """Reload a stored spec (its secret values are ``***``: see `restore_secrets`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CorruptStoreError(source, f"malformed YAML: {exc}") from None
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_to_user_error(exc, source) from None


def stored_checkpoint_section(text: str, source: str) -> CheckpointSpec:
    """The ``checkpoint:`` section of a stored spec, validated on its own (what the checkpoint
    commands need, whatever else the stored spec holds)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CorruptStoreError(source, f"malformed YAML: {exc}") from None
    section = data.get("checkpoint") if isinstance(data, dict) else None
    try:
        return CheckpointSpec.model_validate(section or {})
    except ValidationError as exc:
        raise validation_to_user_error(exc, f"{source}: checkpoint", CheckpointSpec) from None


def restore_secrets(stored: JobSpec, environ: Mapping[str, str]) -> tuple[JobSpec, list[str]]:
    """A stored spec with its secret values back, from where the user put them: the recipe
    file it was launched from (`JobSpec.source`), else a variable of the same name in
    `environ` (the resuming shell). A spec stored by an earlier release still holds its values
    (nothing was redacted then): those are kept. Returns the spec and the secrets found
    nowhere (left out: the checkpoint credentials then come from the standard AWS chain)."""
    recipe: JobSecrets | None = None
    if stored.source and Path(stored.source).is_file():
        try:
            recipe = load_recipe(stored.source).job_secrets()
        except UserError:
            recipe = None
    env: dict[str, str] = {}
    missing: list[str] = []
    for name, stored_value in stored.secrets.items():
        kept = stored_value if stored_value != REDACTED else None
        value = (recipe.env.get(name) if recipe else None) or kept or environ.get(name)
        if value:
            env[name] = value
        else:
            missing.append(name)
    _, wanted = split_options(stored.checkpoint.storage_options)
    _, kept_options = split_options(without_redacted(stored.checkpoint.storage_options))
    options = (recipe.storage_options if recipe else {}) or kept_options
    if wanted and not options:
        missing.append("checkpoint.storage_options credentials")
    return stored.with_secrets(JobSecrets(env=env, storage_options=options)), missing
