"""`trainctl describe JOB`: the job's stored spec and what the store says of it, as YAML (or one
JSON object with `--json`) on stdout.

The spec is shown as stored: secret values were replaced by ``***`` before it was written; every
mapping is passed through `trainctl.secrets.redact` again on the way out, so a store written by
an older release cannot leak a credential through this command either.
"""

from __future__ import annotations

from typing import Any

import typer
import yaml

from trainctl.cli.common import JOB_HELP, JSON_OPTION, STORAGE_OPTION, open_job
from trainctl.cli.console import emit_json, emit_result
from trainctl.cli.times import iso_time
from trainctl.errors import CorruptStoreError
from trainctl.secrets import REDACTED, redact
from trainctl.state import JobRecord


def hide_secrets(spec: Any) -> Any:
    """The stored spec with ``secrets:`` values and every secret-named entry shown as ``***``."""
    if not isinstance(spec, dict):
        return spec
    shown = redact(spec)
    secrets = shown.get("secrets")
    if isinstance(secrets, dict):
        shown["secrets"] = dict.fromkeys(secrets, REDACTED)
    return shown


def description(record: JobRecord, spec: Any) -> dict[str, Any]:
    """The `describe` document: the job's identity and state, then its spec."""
    return {
        "job_id": record.job_id,
        "name": record.name,
        "state": record.state.value,
        "reason": record.reason,
        "scheduler": record.scheduler,
        "scheduler_job_id": record.scheduler_job_id,
        "created_at": iso_time(record.created_at),
        "updated_at": iso_time(record.updated_at),
        "attempts": len(record.attempts),
        "step": record.step,
        "spec": hide_secrets(spec),
    }


def describe(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    storage: str | None = STORAGE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a job's stored spec (secrets as ***), scheduler, created time, state and reason."""
    store, job_id = open_job(storage, job_id)
    record = store.read_state(job_id)
    text = store.read_spec_text(job_id)
    spec: Any = None
    if text is not None:
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as bad:
            raise CorruptStoreError(
                f"{store.job_url(job_id)}/spec.yaml", f"not YAML ({bad})"
            ) from None
    document = description(record, spec)
    if as_json:
        emit_json(document)
        return
    emit_result(yaml.safe_dump(document, sort_keys=False, allow_unicode=True).rstrip("\n"))
