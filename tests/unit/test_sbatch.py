"""sbatch rendering: golden scripts, validation, and hostile values run through a real bash.

Regenerate the golden files after a deliberate change with TRAINCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainctl.errors import UserError
from trainctl.launch.sbatch import SbatchScript, SlurmOptions, render_sbatch

GOLDEN = REPO / "tests" / "golden"
HOSTILE = (
    "sp ace $(touch PWNED) `touch PWNED` 'single' \"double\" \\back $HOME ${PATH} ; & | < > "
    "# % * ? ~ !x\nsecond line\ttab"
)
HOSTILE_ONE_LINE = HOSTILE.replace("\n", " ").replace("\t", " ")
HOSTILE_DIR = "d $(touch PWNED) `touch PWNED` 'q' \"dq\" %j #"


def render(**changes: object) -> SbatchScript:
    """The reference job with some arguments changed."""
    arguments: dict[str, object] = {
        "job_id": "tiny-gpt-20261124-0001",
        "job_name": "tiny-gpt",
        "nodes": 2,
        "options": SlurmOptions(),
        "exclude": [],
        "python": "/opt/venv/bin/python",
        "storage_root": "/shared/trainctl",
        "workdir": "/shared/work",
        "log_path": "/shared/trainctl/jobs/tiny-gpt-20261124-0001/logs/slurm-batch.log",
        "env": {"TRAINCTL_STORAGE": "/shared/trainctl", "PYTHONUNBUFFERED": "1"},
    }
    arguments.update(changes)
    return render_sbatch(**arguments)  # type: ignore[arg-type]


def check_golden(name: str, script: SbatchScript) -> None:
    path = GOLDEN / name
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.write_text(script.describe())
    assert script.describe() == path.read_text()


def test_golden_minimal() -> None:
    script = render()
    check_golden("sbatch-minimal.txt", script)
    assert script.argv == ("sbatch", "--parsable", script.script_path)
    assert script.script_path == "/shared/trainctl/jobs/tiny-gpt-20261124-0001/logs/batch.sbatch"
    assert "--exclude" not in script.text and "--partition" not in script.text


def test_golden_full() -> None:
    options = SlurmOptions(
        partition="gpu,gpu-low",
        time_limit="1-12:00:00",
        signal_grace_s=300,
        extra_args=("--account=ml-research", "--gres=gpu:8", "--comment=two words"),
    )
    script = render(options=options, nodes=4, exclude=["node17", "node03", "node17"])
    check_golden("sbatch-full.txt", script)
    assert "#SBATCH --exclude=node03,node17\n" in script.text


def test_golden_hostile() -> None:
    root = f"/shared/{HOSTILE_DIR}"
    script = render(
        job_name=HOSTILE_ONE_LINE,
        python=f"{root}/bin/python",
        storage_root=f"{root}/store",
        workdir=f"{root}/work",
        log_path=f"{root}/logs/batch %j.log",
        env={"HOSTILE": HOSTILE, "EMPTY": ""},
    )
    check_golden("sbatch-hostile.txt", script)
    # Slurm would read a bare % in the output path as a pattern: it is doubled.
    assert '#SBATCH --output="/shared/d $(touch PWNED)' in script.text
    assert "/logs/batch %%j.log" in script.text


def test_script_parses_with_bash_n(tmp_path: Path) -> None:
    for script in (render(), render(env={"HOSTILE": HOSTILE})):
        path = tmp_path / "batch.sbatch"
        path.write_text(script.text)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


STUB = """\
import json, os, sys
out = os.environ["STUB_OUT"]
with open(out, "w") as handle:
    json.dump({"argv": sys.argv[1:], "hostile": os.environ.get("HOSTILE"),
               "empty": os.environ.get("EMPTY"), "cwd": os.getcwd()}, handle)
"""


def test_hostile_values_arrive_verbatim_and_nothing_runs(tmp_path: Path) -> None:
    """Run the rendered script through bash, with `python` a stub that records what it got."""
    root = tmp_path / HOSTILE_DIR
    (root / "bin").mkdir(parents=True)
    stub = root / "bin" / "python"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "stub.json"
    storage = f"{root}/store {HOSTILE_ONE_LINE}"
    script = render(
        job_name="x",
        python=str(stub),
        storage_root=storage,
        workdir=str(root),
        log_path=f"{root}/logs/batch.log",
        env={"HOSTILE": HOSTILE, "EMPTY": "", "STUB_OUT": str(out)},
    )
    path = tmp_path / "batch.sbatch"
    path.write_text(script.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    result = subprocess.run(
        ["bash", str(path)], cwd=work, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    assert got["argv"] == [
        "-m",
        "trainctl.cli.main",
        "resume",
        "tiny-gpt-20261124-0001",
        "--storage",
        storage,
    ]
    assert got["hostile"] == HOSTILE
    assert got["empty"] == ""
    assert "restart 0" in result.stderr, "SLURM_RESTART_COUNT unset reads as restart 0"
    assert not list(tmp_path.rglob("PWNED")), "a hostile value was executed"


def test_directive_values_read_back_like_sbatch() -> None:
    """Each `#SBATCH` value, read with sbatch's own rules (quotes; backslash escapes the next
    character, also inside quotes; an unquoted # ends the line), is the value rendered."""
    name = "a b \"c\" 'd' \\e #f $(g) `h` %"
    script = render(job_name=name)
    [line] = [line for line in script.text.splitlines() if line.startswith("#SBATCH --job-name")]
    assert sbatch_argument(line[len("#SBATCH ") :]) == f"--job-name={name}"


def sbatch_argument(text: str) -> str:
    """sbatch 22.05's `_get_argument` (src/sbatch/opt.c), for one argument."""
    out, quote, escaped = [], "", False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
            continue
        elif quote:
            if char == quote:
                quote = ""
                continue
        elif char in "\"'":
            quote = char
            continue
        elif char == "#" or char.isspace():
            break
        out.append(char)
    assert not quote, f"unmatched {quote}"
    return "".join(out)


@pytest.mark.parametrize(
    ("changes", "where", "problem"),
    [
        ({"options": SlurmOptions(partition="gpu;rm")}, "--partition", "partition"),
        ({"options": SlurmOptions(partition="")}, "--partition", "partition"),
        ({"options": SlurmOptions(time_limit="4h")}, "--time", "time limit"),
        ({"options": SlurmOptions(time_limit="1:2:3:4")}, "--time", "time limit"),
        ({"options": SlurmOptions(signal_grace_s=0)}, "slurm.signal_grace_s", "grace"),
        ({"options": SlurmOptions(signal_grace_s=70000)}, "slurm.signal_grace_s", "grace"),
        ({"options": SlurmOptions(extra_args=("-A ml",))}, "slurm.extra_args[0]", "long"),
        ({"options": SlurmOptions(extra_args=("--no-requeue",))}, "slurm.extra_args[0]", "sets"),
        ({"options": SlurmOptions(extra_args=("--requ",))}, "slurm.extra_args[0]", "sets"),
        ({"options": SlurmOptions(extra_args=("--output=/x",))}, "slurm.extra_args[0]", "sets"),
        ({"options": SlurmOptions(extra_args=("--a=\nb",))}, "slurm.extra_args[0]", "control"),
        ({"job_name": ""}, "job name", "empty"),
        ({"job_name": "two\nlines"}, "job name", "control"),
        ({"job_name": "x" * 1025}, "job name", "1024 bytes"),
        ({"nodes": 0}, "--nodes", "at least one node"),
        ({"exclude": ["n1,n2"]}, "blocklist", "node name"),
        ({"exclude": ["$(x)"]}, "blocklist", "node name"),
        ({"python": "python3"}, "python", "absolute"),
        ({"storage_root": "relative/store"}, "storage root", "absolute"),
        ({"workdir": "."}, "workdir", "absolute"),
        ({"log_path": "/a\\b/log"}, "log path", "backslash"),
        ({"log_path": "/a/lo\ng"}, "log path", "control"),
        ({"env": {"1BAD": "x"}}, "env", "variable name"),
        ({"env": {"A B": "x"}}, "env", "variable name"),
        ({"env": {"OK": "nul\0byte"}}, "env OK", "NUL"),
    ],
)
def test_rejects_what_sbatch_would(changes: dict[str, object], where: str, problem: str) -> None:
    with pytest.raises(UserError) as raised:
        render(**changes)
    assert where in str(raised.value.where)
    assert problem in raised.value.problem


@pytest.mark.parametrize(
    "time_limit",
    ["30", "30:00", "04:00:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED", "infinite"],
)
def test_accepts_every_sbatch_time_format(time_limit: str) -> None:
    assert (
        f"#SBATCH --time={time_limit}\n" in render(options=SlurmOptions(time_limit=time_limit)).text
    )


def test_storage_url_and_extra_args_are_passed_through() -> None:
    script = render(
        storage_root="s3://bucket/trainctl",
        options=SlurmOptions(extra_args=("--hold", "--gres=gpu:8", "--exclusive")),
    )
    assert script.text.rstrip().endswith("--storage s3://bucket/trainctl")
    assert "#SBATCH --hold\n#SBATCH --gres=gpu:8\n#SBATCH --exclusive\n" in script.text
    assert shlex.split(script.describe().splitlines()[0])[1:] == list(script.argv)
