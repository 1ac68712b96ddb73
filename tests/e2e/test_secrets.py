"""Secrets never leave where the user put them.

A real job whose recipe holds fake S3 credentials (checkpoints go to a moto endpoint that
needs them: the test's environment has none) and a ``WANDB_API_KEY`` in ``env:``. The worker
must see the key and the checkpoints must commit; and then the secret strings must be nowhere
else: not in any file under the store and run directory, any event, any CLI output (dry run,
launch, status, events, report, health, ckpt), nor in the environment or command line of any
process of the job while it runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.conftest import BUCKET, S3
from tests.e2e.harness import (
    Result,
    assert_no_leftovers,
    job_processes,
    start_launch,
    trainctl,
    wait_for_step,
    write_recipe,
)

pytestmark = pytest.mark.e2e

KEY = "AKIAFAKEKEYFORTRAINCTL"
SECRET = "fake-secret-value-never-shown-0042"
WANDB = "wandb-fake-api-key-do-not-print-77"
SECRETS = (KEY, SECRET, WANDB)


def leaks(text: str | bytes) -> list[str]:
    raw = text.encode() if isinstance(text, str) else text
    return [s for s in SECRETS if s.encode() in raw]


def process_leaks(job_id: str, controller: int) -> dict[int, list[str]]:
    """Secrets in the environment or command line of the controller or any job process."""
    found: dict[int, list[str]] = {}
    for pid in {controller, *job_processes(job_id)}:
        for part in ("environ", "cmdline"):
            try:
                raw = Path(f"/proc/{pid}/{part}").read_bytes()
            except OSError:
                continue
            if leaks(raw):
                found[pid] = leaks(raw)
    return found


def test_no_secret_anywhere_but_where_the_user_put_it(tmp_path: Path, s3: S3) -> None:
    storage = tmp_path / "store"
    storage.mkdir()
    probes = tmp_path / "probes"
    probes.mkdir()
    recipe = write_recipe(
        tmp_path,
        "secret-gpt",
        script=str(REPO / "tests" / "e2e" / "scripts" / "secret_gpt.py"),
        max_steps=12,
        env={"WANDB_API_KEY": WANDB, "ENV_PROBE_DIR": str(probes)},
        config={"step_sleep_s": 0.15},
        checkpoint={
            "interval_steps": 5,
            "storage": f"s3://{BUCKET}/secret-ckpt",
            "storage_options": {"endpoint_url": s3.url, "key": KEY, "secret": SECRET},
        },
    )
    outputs: list[Result] = []
    dry = trainctl("launch", str(recipe), "--dry-run", storage=storage)
    assert dry.returncode == 0 and "WANDB_API_KEY=***" in dry.stdout, dry.stderr
    outputs.append(dry)
    outputs.append(trainctl("launch", str(recipe), "--dry-run", "--json", storage=storage))

    proc = start_launch(str(recipe), job_id="secret", storage=storage)
    try:
        wait_for_step(storage, "secret", 3)
        seen = process_leaks("secret", proc.pid)
        assert len(job_processes("secret")) >= 6  # agents, torchruns, shims, workers...
        secrets_file = storage / "jobs" / "secret" / "private" / "secrets.json"
        assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
        assert oct(secrets_file.parent.stat().st_mode & 0o777) == "0o700"
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert_no_leftovers("secret")
    assert seen == {}, f"secrets in process environments: {seen}"
    assert proc.returncode == 0, stderr
    outputs.append(Result(proc.returncode, stdout, stderr))
    assert not secrets_file.exists(), "the secrets file outlived the job"

    # The worker saw the key; the checkpoints committed with the recipe's credentials.
    expected = hashlib.sha256(WANDB.encode()).hexdigest()
    assert {p.read_text() for p in probes.iterdir()} == {expected}
    env = s3.env()  # `ckpt` reads through the standard AWS chain (credentials are not stored)
    for args in (
        ("status", "secret"),
        ("status", "secret", "--json"),
        ("events", "secret"),
        ("events", "secret", "--json"),
        ("report", "secret", "--json"),
        ("health", "secret", "--json"),
        ("ckpt", "ls", "secret", "--json"),
    ):
        result = trainctl(*args, storage=storage, **env)
        assert result.returncode == 0, (args, result.stderr)
        outputs.append(result)
    committed = json.loads(outputs[-1].stdout)["steps"]
    assert [s["step"] for s in committed if s["committed"]] == [5, 10]
    events = json.loads(outputs[-4].stdout)
    assert any(e["kind"] == "checkpoint_committed" for e in events)

    for output in outputs:
        assert leaks(output.stdout + output.stderr) == [], output
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert any(p.name == "spec.yaml" for p in files) and any("logs" in p.parts for p in files)
    leaked = {str(p): leaks(p.read_bytes()) for p in files if leaks(p.read_bytes())}
    assert leaked == {}, leaked
    stored = yaml.safe_load((storage / "jobs" / "secret" / "spec.yaml").read_text())
    assert stored["secrets"] == {"WANDB_API_KEY": "***"}
    assert stored["checkpoint"]["storage_options"]["secret"] == "***"
