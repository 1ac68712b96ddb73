"""What a node agent needs around torchrun: a warm one waiting, and the errors it leaves.

`WarmTorchrun` is one `trainctl.launch.warmrun` process importing torch until the agent hands
it the attempt's argv and environment (on stdin, never its own environment); the relaunch
then skips ~1.2 s of imports. `collect_error_files` reads the error.json files torchrun's
``@record`` (or trainctl.runtime's hook) writes for a worker that died with an exception.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import IO

from trainctl.protocol import ErrorFile

TORCHRUN_MODULE = ("-m", "torch.distributed.run")


def collect_error_files(error_dir: str) -> tuple[ErrorFile, ...]:
    """The error.json files under `error_dir`, oldest first.

    Only workers that died with a Python exception write one; a SIGKILLed worker writes none.
    """
    errors: list[ErrorFile] = []
    for path in Path(error_dir).rglob("error.json"):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        message = raw.get("message", {}) if isinstance(raw, dict) else raw
        timestamp = 0.0
        if isinstance(message, dict):
            text = str(message.get("message", ""))
            extra = message.get("extraInfo", {})
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                timestamp = float(extra.get("timestamp", 0) or 0)
        else:
            text = str(message)
        errors.append(ErrorFile(str(path), text, timestamp, path.parent.name))
    return tuple(sorted(errors, key=lambda e: e.timestamp))


class WarmTorchrun:
    """One `trainctl.launch.warmrun` process, importing torch until it is handed an argv."""

    def __init__(self, python: str, env: dict[str, str], log: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            [python, "-m", "trainctl.launch.warmrun"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.process.stdin is not None
        request = json.dumps({"argv": argv, "env": env}) + "\n"
        self.process.stdin.write(request.encode())
        self.process.stdin.close()
        return self.process

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def can_warm_start(argv: list[str]) -> bool:
    """Whether `argv` runs torchrun as a module, which a warm torchrun can take over."""
    return len(argv) > 3 and tuple(argv[1:3]) == TORCHRUN_MODULE
