"""Fixtures shared by the whole suite: a sealed CLI environment and a storage root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def sealed_env(storage: Path | str, **extra: str) -> dict[str, str]:
    """The environment CLI tests run in: no colour, fixed width, a temp storage root and HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "TORCHELASTIC_"))}
    env.update(
        NO_COLOR="1",
        COLUMNS="80",
        TERM="dumb",
        TRAINCTL_STORAGE=str(storage),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def python() -> str:
    return sys.executable
