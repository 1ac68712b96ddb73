"""A worker's settings, read once from the environment its node agent set.

`WorkerSettings.from_environ` is the one place the runtime reads TRAINCTL_* variables: every
value is parsed and checked here (a bad one raises ValueError naming the variable), and the
``checkpoint:`` section arrives as the validated `CheckpointSpec`, so its defaults are the
spec's and nobody restates them. Without trainctl (a plain ``python script.py``) every setting
takes its neutral value: no agent, no checkpoints, one process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from trainctl.env import Env
from trainctl.errors import first_problem
from trainctl.spec import CheckpointSpec, HealthSpec


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    job_id: str = "local"
    node: str = "local"
    attempt: int = 0
    seed: int = 0
    max_steps: int | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The recipe's free-form ``config:``."""
    checkpoint: CheckpointSpec | None = None
    """The recipe's ``checkpoint:`` section, credentials left out (None: no checkpoints)."""
    checkpoint_root: str | None = None
    health: HealthSpec = dataclasses.field(default_factory=HealthSpec)
    """The recipe's ``health:`` section (the spec's defaults without trainctl)."""
    agent_socket: str | None = None
    """The node agent's datagram socket (None: reports go nowhere)."""
    worker_token: str = ""
    stacks_dir: str | None = None
    worker_server_dir: str | None = None
    secrets_file: str | None = None
    faults_dir: str | None = None
    """Testing: a storage-outage fault is planned; the checkpoint storage watches this dir."""
    step_log: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSettings:
        def text(name: str) -> str | None:
            return environ.get(name) or None

        def number(name: str, default: int | None) -> int | None:
            value = text(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {value!r}") from None

        def document(name: str) -> Any:
            value = text(name)
            try:
                return None if value is None else json.loads(value)
            except ValueError as bad:
                raise ValueError(f"{name}: not JSON ({bad})") from None

        config = document(Env.CONFIG) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{Env.CONFIG}: expected a JSON object")
        checkpoint = None
        section = document(Env.CHECKPOINT)
        if section is not None:
            try:
                checkpoint = CheckpointSpec.model_validate(section)
            except ValidationError as bad:
                raise ValueError(f"{Env.CHECKPOINT}: {first_problem(bad)}") from None
        health = HealthSpec()
        section = document(Env.HEALTH)
        if section is not None:
            try:
                health = HealthSpec.model_validate(section)
            except ValidationError as bad:
                raise ValueError(f"{Env.HEALTH}: {first_problem(bad)}") from None
        return cls(
            job_id=text(Env.JOB_ID) or "local",
            node=text(Env.NODE) or "local",
            attempt=number(Env.ATTEMPT, 0) or 0,
            seed=number(Env.SEED, 0) or 0,
            max_steps=number(Env.MAX_STEPS, None),
            config=config,
            checkpoint=checkpoint,
            checkpoint_root=text(Env.CHECKPOINT_ROOT),
            health=health,
            agent_socket=text(Env.AGENT_SOCKET),
            worker_token=text(Env.WORKER_TOKEN) or "",
            stacks_dir=text(Env.STACKS_DIR),
            worker_server_dir=text(Env.WORKER_SERVER_DIR),
            secrets_file=text(Env.SECRETS_FILE),
            faults_dir=text(Env.FAULTS_DIR),
            step_log=text(Env.STEP_LOG),
        )
