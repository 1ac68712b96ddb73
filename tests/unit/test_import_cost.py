"""Every trainctl command starts fast: the CLI imports neither torch nor the optional heavy
libraries (each costs seconds on a busy node, and a tool's commands must stay responsive).

A regression here made every command, `--version` included, take 3.7 s instead of 0.7 s: the
memory tier's module imported the checkpointer (torch) for a type annotation."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "matplotlib", "ray", "boto3", "s3fs")


def heavy_imports(code: str) -> list[str]:
    """The `HEAVY` libraries a fresh interpreter has imported after running `code`."""
    listed = f"sorted(m for m in {HEAVY!r} if m in sys.modules)"
    probe = f"{code}\nimport json, sys\nprint(json.dumps({listed}))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_the_cli_imports_no_heavy_library() -> None:
    assert heavy_imports("import trainctl.cli.main") == []


def test_the_controller_and_agent_start_an_attempt_without_torch(tmp_path) -> None:
    """The controller raises the checkpoint fence before every attempt, and the node agent runs
    the memory tier's holder: neither may import torch (the fence's transfer settings lived in
    the checkpointer once, and every job's first attempt started ~1 s late for it)."""
    code = (
        "import trainctl.recovery.controller, trainctl.launch.agent, trainctl.checkpoint.holder\n"
        "from trainctl.checkpoint import fence\n"
        "from trainctl.checkpoint.storage import open_storage, transfer_config\n"
        "from trainctl.spec import CheckpointSpec\n"
        f"storage = open_storage({str(tmp_path)!r}, config=transfer_config(CheckpointSpec()))\n"
        "fence.advance(storage, 3)\n"
        "assert fence.read_fence(storage) == 3"
    )
    assert heavy_imports(code) == []
