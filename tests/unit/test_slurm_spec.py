"""The recipe's ``slurm:`` section: every bad value is one UserError naming the file and
``slurm.<field>``; `launch`'s Slurm flags override it; stored specs of earlier releases
(``recovery.drain_blamed_nodes``) still load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.harness import trainctl
from trainctl.errors import UserError
from trainctl.recipe import load_recipe, spec_from_yaml, spec_to_yaml

SCRIPT = str(REPO / "recipes" / "tiny_gpt.py")
EXAMPLE = REPO / "recipes" / "examples" / "slurm-8xh100.yaml"


def recipe(tmp_path: Path, slurm: Any, **more: Any) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "script": SCRIPT, "slurm": slurm, **more}))
    return path


@pytest.mark.parametrize(
    ("slurm", "field", "problem", "fix"),
    [
        ({"partition": "gpu;rm"}, "slurm.partition", "partition", "sinfo"),
        ({"time_limit": "4h"}, "slurm.time_limit", "time limit", "HH:MM:SS"),
        ({"gpus_per_node": -1}, "slurm.gpus_per_node", ">= 0", "e.g."),
        ({"gpus_per_node": "eight"}, "slurm.gpus_per_node", "whole number", "right type"),
        ({"gpu_type": "h100"}, "slurm.gpu_type", "no GPUs", "gpus_per_node"),
        ({"gpus_per_node": 8, "gpu_type": "h100:8"}, "slurm.gpu_type", "GPU type", "letters"),
        ({"gpu_request": "gpus"}, "slurm.gpu_request", "gpus-per-node", "gres"),
        ({"account": "ml research"}, "slurm.account", "account name", "letters"),
        ({"qos": "high,low"}, "slurm.qos", "QOS name", "letters"),
        ({"constraint": "h100 ib"}, "slurm.constraint", "feature", "&"),
        ({"reservation": "$(x)"}, "slurm.reservation", "reservation", "letters"),
        ({"exclusive": "sometimes"}, "slurm.exclusive", "true or false", "right type"),
        ({"mem": "1.5G"}, "slurm.mem", "memory size", "500G"),
        ({"mem": "lots"}, "slurm.mem", "memory size", "500G"),
        ({"cpus_per_task": 0}, "slurm.cpus_per_task", ">= 1", "e.g."),
        ({"signal_grace_s": 0}, "slurm.signal_grace_s", "1..65535", "checkpoint"),
        ({"signal_grace_s": 70000}, "slurm.signal_grace_s", "1..65535", "checkpoint"),
        ({"drain_blamed_nodes": "maybe"}, "slurm.drain_blamed_nodes", "true or", "right type"),
        ({"extra_args": ["-A ml"]}, "slurm.extra_args[0]", "long options", "--comment"),
        ({"extra_args": ["--hold", "--requeue"]}, "slurm.extra_args[1]", "sets --requeue", ""),
        ({"extra_args": ["--output=/x"]}, "slurm.extra_args[0]", "sets --output", ""),
        ({"extra_args": ["--account=ml"]}, "slurm.extra_args[0]", "--account", "slurm.account"),
        ({"extra_args": ["--mem=4G"]}, "slurm.extra_args[0]", "--mem", "slurm.mem"),
        ({"extra_args": ["--excl"]}, "slurm.extra_args[0]", "--exclu", ""),
        ({"extra_args": ["--gres=gpu:8"]}, "slurm.extra_args[0]", "GPUs", "gpus_per_node"),
        ({"extra_args": ["--a=\nb"]}, "slurm.extra_args[0]", "control character", "one line"),
        ({"gpu": 8}, "slurm.gpu", "unknown field", "spelling"),
        ("gpu", "slurm", "not a section", "right type"),
    ],
)
def test_each_bad_value_is_one_clear_error(
    tmp_path: Path, slurm: Any, field: str, problem: str, fix: str
) -> None:
    path = recipe(tmp_path, slurm)
    with pytest.raises(UserError) as raised:
        load_recipe(path)
    error = raised.value
    assert error.where == f"{path}: {field}"
    assert problem in error.problem
    assert fix in (error.fix or "")
    assert error.exit_code == 2


def test_good_section_loads_and_yaml_numbers_are_sbatch_sizes(tmp_path: Path) -> None:
    spec = load_recipe(
        recipe(
            tmp_path,
            {
                "gpus_per_node": 8,
                "gpu_type": "h100",
                "gpu_request": "gres",
                "mem": 0,
                "reservation": "a,b",
                "constraint": "[rack1|rack2]&h100",
                "extra_args": ["--comment=x y", "--gpus=16"],
            },
        )
    )
    assert spec.slurm.mem == "0" and spec.slurm.gpu_request == "gres"
    assert spec.slurm.extra_args == ("--comment=x y", "--gpus=16")
    assert load_recipe(recipe(tmp_path, {})).slurm.gpus_per_node == 0


OLD_STORED_SPEC = """\
name: tiny-gpt
script: /opt/recipes/tiny_gpt.py
nodes: 2
recovery:
  crash_loop_limit: 3
  repeat_offender_crashes: 2
  repeat_offender_window_s: 3600.0
  restarts_per_cause: {node_fault: 8, worker_crash: 5, software_error: 3, hang: 3, storage: 5}
  exclude_s: 3600.0
  drain_blamed_nodes: {drain}
"""


@pytest.mark.parametrize("drain", [False, True])
def test_spec_stored_by_an_earlier_release_loads(drain: bool) -> None:
    text = OLD_STORED_SPEC.replace("{drain}", str(drain).lower())
    spec = spec_from_yaml(text, "jobs/old/spec.yaml")
    assert spec.slurm.drain_blamed_nodes is drain
    assert spec.recovery.exclude_s == 3600.0
    stored = spec_to_yaml(spec)
    assert "drain_blamed_nodes" not in yaml.safe_load(stored)["recovery"]
    assert spec_from_yaml(stored, "again") == spec


def test_old_and_new_drain_keys_must_agree(tmp_path: Path) -> None:
    same = recipe(tmp_path, {"drain_blamed_nodes": True}, recovery={"drain_blamed_nodes": True})
    assert load_recipe(same).slurm.drain_blamed_nodes
    clash = recipe(tmp_path, {"drain_blamed_nodes": False}, recovery={"drain_blamed_nodes": True})
    with pytest.raises(UserError, match="disagree"):
        load_recipe(clash)


def test_slurm_section_does_not_stop_a_local_launch(storage: Path) -> None:
    result = trainctl("launch", str(EXAMPLE), "--nodes", "1", "--dry-run", storage=storage)
    assert result.returncode == 0, result.stderr
    assert "torchrun" in result.stdout or "--nproc" in result.stdout


def test_flags_override_the_section_field_by_field(storage: Path) -> None:
    result = trainctl(
        "launch",
        str(EXAMPLE),
        "--scheduler",
        "slurm",
        "--dry-run",
        "--account",
        "other",
        "--gpus-per-node",
        "a100:4",
        "--no-exclusive",
        "--mem",
        "500G",
        "--cpus-per-task",
        "32",
        "--qos",
        "low",
        "--constraint",
        "ib",
        "--reservation",
        "r1",
        "--time",
        "30",
        "--partition",
        "gpu2",
        "--sbatch-arg=--comment=from cli",
        "--sbatch-arg",
        "--hold",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in (
        "--account=other",
        "--gpus-per-node=a100:4",
        "--mem=500G",
        "--cpus-per-task=32",
        "--qos=low",
        "--constraint=ib",
        "--reservation=r1",
        "--time=30",
        "--partition=gpu2",
        '--comment="from cli"',
        "--hold",
        "--signal=B:USR1@600",  # from the recipe, untouched
    ):
        assert f"#SBATCH {expected}" in lines, expected
    assert "#SBATCH --exclusive" not in lines


@pytest.mark.parametrize(
    ("flags", "where"),
    [
        (["--mem", "1.5G"], "--mem (slurm.mem)"),
        (["--gpus-per-node", "lots"], "--gpus-per-node"),
        (["--gpus-per-node", "h 1:2"], "--gpus-per-node (slurm.gpu_type)"),
        (["--account", "a b"], "--account (slurm.account)"),
        (["--sbatch-arg", "--nodes=3"], "--sbatch-arg (slurm.extra_args[0])"),
        (["--sbatch-arg", "--qos=x"], "--sbatch-arg (slurm.extra_args[0])"),
        (["--time", "4h"], "--time (slurm.time_limit)"),
    ],
)
def test_bad_flag_is_one_message_naming_it(storage: Path, flags: list[str], where: str) -> None:
    result = trainctl(
        "launch",
        "recipes/tiny-gpt.yaml",
        "--scheduler",
        "slurm",
        "--dry-run",
        *flags,
        storage=storage,
    )
    assert result.returncode == 2, result.stderr
    assert where in result.stderr
    assert "Traceback" not in result.stderr and "fix:" in result.stderr
    assert not (storage / "jobs").exists()
