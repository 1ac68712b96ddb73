"""CLI golden tests in a sealed environment (NO_COLOR=1, COLUMNS=80, temp storage)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.harness import trainctl
from trainctl.exitcodes import EXIT_CODE_MEANINGS, ExitCode

GOLDEN = REPO / "tests" / "golden"


def normalise(text: str, storage: Path) -> str:
    return (
        text.replace(str(storage), "<storage>")
        .replace(sys.executable, "<python>")
        .replace(str(REPO), "<repo>")
    )


def test_dry_run_golden(storage: Path) -> None:
    result = trainctl(
        "launch",
        "recipes/tiny-gpt.yaml",
        "--nodes",
        "2",
        "--job-id",
        "golden",
        "--rdzv-port",
        "29500",
        "--dry-run",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    got = normalise(result.stdout, storage)
    expected = (GOLDEN / "dry-run-tiny-gpt.txt").read_text()
    assert got == expected
    assert not (storage / "jobs").exists(), "a dry run must not write the store"


def test_dry_run_json_is_one_object(storage: Path) -> None:
    result = trainctl(
        "launch", "recipes/dcnv2.yaml", "--dry-run", "--json", "--job-id", "d", storage=storage
    )
    plan = json.loads(result.stdout)
    assert plan["job_id"] == "d" and plan["world_size"] == 2 and len(plan["nodes"]) == 2


BAD_INPUTS = [
    (["launch", "recipes/nope.yaml"], "recipes/nope.yaml: recipe file not found"),
    (["launch", "recipes/tiny-gpt.yaml", "--nodes", "0"], "Invalid value for '--nodes'"),
    (["launch", "recipes/tiny-gpt.yaml", "--storage", "gs://b"], "--storage: unsupported"),
    (["launch", "recipes/tiny-gpt.yaml", "--job-id", "../up"], "--job-id: invalid job id"),
    (["launch", "README.md"], "TARGET: cannot tell what to launch"),
    (["launch", "nope.py"], "SCRIPT: training script not found"),
    (["status", "nope"], "no such job"),
    (["launch", "recipes/tiny-gpt.yaml", "--bogus"], "No such option"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_message(storage: Path, args: list[str], message: str) -> None:
    result = trainctl(*args, storage=storage)
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (storage / "jobs").exists()


def test_bad_recipe_field_via_cli(storage: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    (tmp_path / "t.py").write_text("")
    recipe.write_text("script: t.py\ncheckpoint:\n  interval_step: 5\n")
    result = trainctl("launch", str(recipe), storage=storage)
    assert result.returncode == 2
    assert f"{recipe}: checkpoint.interval_step: unknown field (got 5)" in result.stderr
    assert "fix: did you mean `checkpoint.interval_steps`?" in result.stderr


def test_list_empty_and_json(storage: Path) -> None:
    assert trainctl("list", "--json", storage=storage).json() == []
    assert "no jobs under" in trainctl("list", storage=storage).stderr


def test_exit_code_table_matches_readme() -> None:
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\d)` \| ([^|]+?) \|", readme, flags=re.M))
    assert {int(k): v.strip() for k, v in rows.items()} == {
        int(code): meaning for code, meaning in EXIT_CODE_MEANINGS.items()
    }
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)


def test_cli_surface_is_deliberate(storage: Path) -> None:
    """Every command and launch option, listed: growth of the surface is a decision."""
    top = trainctl("--help", storage=storage).stdout
    for command in (
        "launch",
        "resume",
        "cancel",
        "list",
        "status",
        "events",
        "describe",
        "logs",
        "health",
        "report",
        "ckpt",
        "top",
        "metrics",
    ):
        assert re.search(rf"│ {command}\s", top), command
    launch_help = trainctl("launch", "--help", storage=storage).stdout
    options = sorted(set(re.findall(r"(--[a-z][a-z-]+)", launch_help)))
    assert options == sorted(
        [
            "--nodes",
            "--nproc-per-node",
            "--storage",
            "--job-id",
            "--max-steps",
            "--seed",
            "--rdzv-port",
            "--dry-run",
            "--scheduler",
            "--partition",
            "--time",
            "--gpus-per-node",
            "--account",
            "--qos",
            "--constraint",
            "--reservation",
            "--exclusive",
            "--no-exclusive",
            "--mem",
            "--cpus-per-task",
            "--sbatch-arg",
            "--fault",
            "--metrics-port",
            "--metrics-host",
            "--json",
            "--quiet",
            "--verbose",
            "--help",
            "--address",
            "--place-timeout",
        ]
    )


def test_text_from_the_store_is_shown_verbatim_never_as_markup(storage: Path) -> None:
    """Error messages hold brackets (gloo: ``[/__w/.../pair.cc:553] Connection closed``)."""
    from trainctl.events import AttemptEnded, Event
    from trainctl.state import AttemptRecord, AttemptState, JobRecord, JobState
    from trainctl.store import JobStore

    reason = "node-0: RuntimeError: [/__w/gloo/pair.cc:553] Connection closed [bold]x[/bold]"
    store = JobStore(str(storage))
    record = JobRecord(job_id="brackets", name="n", created_at=1.0, updated_at=1.0)
    attempt = AttemptRecord(number=0, started_at=1.0, nodes=["node-0"], reason=reason)
    attempt.state = AttemptState.FAILED
    record.attempts.append(attempt)
    record.state, record.reason = JobState.FAILED, reason
    store.create(record, "name: n\nscript: x.py\n")
    store.append_event("brackets", Event(2.0, reason, AttemptEnded(outcome="failed")))
    for command in ("status", "events", "report"):
        result = trainctl(command, "brackets", storage=storage)
        assert result.returncode == 0, (command, result.stderr)
        assert "[/__w/gloo/pair.cc:553]" in result.stdout, command
        assert "[bold]x[/bold]" in result.stdout, command


def test_slurm_dry_run_prints_the_sbatch_command_and_script(storage: Path) -> None:
    result = trainctl(
        "launch",
        "recipes/tiny-gpt.yaml",
        "--scheduler",
        "slurm",
        "--partition",
        "gpu",
        "--time",
        "01:00:00",
        "--job-id",
        "sdry",
        "--dry-run",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("$ sbatch --parsable ")
    for line in ("#SBATCH --nodes=2", "#SBATCH --requeue", "#SBATCH --partition=gpu"):
        assert line in out, line
    assert "resume sdry --storage" in out
    assert not (storage / "jobs").exists(), "a dry run must not write the store"


def test_slurm_options_need_the_slurm_scheduler(storage: Path) -> None:
    result = trainctl("launch", "recipes/tiny-gpt.yaml", "--time", "10", storage=storage)
    assert result.returncode == 2
    assert "--time: Slurm option(s), for --scheduler slurm" in result.stderr
    assert "Traceback" not in result.stderr
    faults = trainctl(
        "launch",
        "recipes/tiny-gpt.yaml",
        "--scheduler",
        "slurm",
        "--fault",
        "kill-node:node-1@step=3",
        "--dry-run",
        storage=storage,
    )
    assert faults.returncode == 2 and "local scheduler only" in faults.stderr
