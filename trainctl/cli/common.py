"""Options and helpers shared by the commands."""

from __future__ import annotations

import typer

from trainctl.store import JobStore, resolve_storage_root

STORAGE_OPTION = typer.Option(
    None,
    "--storage",
    help="Storage root (path, file:// or s3://). Default: $TRAINCTL_STORAGE or ~/.trainctl.",
)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def open_store(storage: str | None) -> JobStore:
    return JobStore(resolve_storage_root(storage))
