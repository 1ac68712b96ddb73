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


FULL_H100 = SlurmOptions(
    partition="gpu,gpu-low",
    time_limit="1-12:00:00",
    gpus_per_node=8,
    gpu_type="h100",
    account="ml-research",
    qos="high",
    constraint="h100&ib",
    reservation="maint-window",
    exclusive=True,
    mem="0",
    cpus_per_task=96,
    signal_grace_s=300,
    extra_args=("--comment=two words", "--mail-type=END", "--hold"),
)


def test_golden_full_8xh100_request() -> None:
    script = render(options=FULL_H100, nodes=4, exclude=["node17", "node03", "node17"])
    check_golden("sbatch-full.txt", script)
    assert "#SBATCH --exclude=node03,node17\n" in script.text
    directives = [line for line in script.text.splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--partition=gpu,gpu-low",
        "--time=1-12:00:00",
        "--gpus-per-node=h100:8",
        "--account=ml-research",
        "--qos=high",
        '--constraint="h100&ib"',
        "--reservation=maint-window",
        "--exclusive",
        "--mem=0",
        "--cpus-per-task=96",
        '--comment="two words"',
        "--mail-type=END",
        "--hold",
    ):
        assert f"#SBATCH {expected}" in directives, expected
    assert "--gres" not in script.text


def test_golden_gres_form_with_type() -> None:
    options = SlurmOptions(gpus_per_node=2, gpu_type="a100_80g", gpu_request="gres")
    script = render(options=options)
    check_golden("sbatch-gres.txt", script)
    assert "#SBATCH --gres=gpu:a100_80g:2\n" in script.text
    assert "--gpus-per-node" not in script.text
    untyped = render(options=SlurmOptions(gpus_per_node=4, gpu_request="gres")).text
    assert "#SBATCH --gres=gpu:4\n" in untyped
    assert "#SBATCH --gpus-per-node=4\n" in render(options=SlurmOptions(gpus_per_node=4)).text
    assert "gpu" not in render(options=SlurmOptions(gpus_per_node=0, gpu_request="gres")).text


AWKWARD = SlurmOptions(
    constraint="[rack1|rack2]&(h100*2)",
    reservation="a,b",
    mem="512000",
    extra_args=(
        '--comment=it\'s "quoted" #not-a-comment $(touch PWNED) `x` back\\slash',
        "--mail-user=a+b@example.org",
        "--begin=now+1hour",
    ),
)


def test_golden_awkward_values_are_quoted_and_read_back_verbatim() -> None:
    script = render(options=AWKWARD)
    check_golden("sbatch-awkward.txt", script)
    directives = {
        sbatch_argument(line[len("#SBATCH ") :]).partition("=")[0]: sbatch_argument(
            line[len("#SBATCH ") :]
        ).partition("=")[2]
        for line in script.text.splitlines()
        if line.startswith("#SBATCH ")
    }
    assert directives["--constraint"] == AWKWARD.constraint
    assert directives["--reservation"] == "a,b"
    assert directives["--comment"] == AWKWARD.extra_args[0].partition("=")[2]
    assert directives["--mail-user"] == "a+b@example.org"
    assert directives["--begin"] == "now+1hour"


def test_example_recipe_renders_golden(storage: Path) -> None:
    """recipes/examples/slurm-8xh100.yaml loads, and its --dry-run is the golden script."""
    from tests.e2e.harness import trainctl
    from trainctl.recipe import load_recipe

    recipe = REPO / "recipes" / "examples" / "slurm-8xh100.yaml"
    spec = load_recipe(recipe)
    assert spec.nodes == 64 and spec.nproc_per_node == "gpu" and spec.health.require_nvml
    assert spec.slurm.gpus_per_node == 8 and spec.slurm.gpu_type == "h100"
    assert spec.slurm.mem == "0" and spec.slurm.exclusive
    assert spec.checkpoint.storage is not None and spec.checkpoint.storage.startswith("s3://")
    result = trainctl(
        "launch",
        str(recipe),
        "--scheduler",
        "slurm",
        "--job-id",
        "golden",
        "--dry-run",
        storage=storage,
    )
    assert result.returncode == 0, result.stderr
    got = (
        result.stdout.replace(str(storage), "<storage>")
        .replace(sys.executable, "<python>")
        .replace(str(REPO), "<repo>")
    )
    path = GOLDEN / "sbatch-slurm-8xh100.txt"
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert got == path.read_text()
    assert not (storage / "jobs").exists(), "a dry run writes nothing"


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
        ({"options": SlurmOptions(partition="gpu;rm")}, "slurm.partition", "partition"),
        ({"options": SlurmOptions(partition="")}, "slurm.partition", "partition"),
        ({"options": SlurmOptions(time_limit="4h")}, "slurm.time_limit", "time limit"),
        ({"options": SlurmOptions(time_limit="1:2:3:4")}, "slurm.time_limit", "time limit"),
        ({"options": SlurmOptions(gpus_per_node=-1)}, "slurm.gpus_per_node", ">= 0"),
        ({"options": SlurmOptions(gpu_type="h100")}, "slurm.gpu_type", "no GPUs"),
        (
            {"options": SlurmOptions(gpus_per_node=1, gpu_type="h100:2")},
            "slurm.gpu_type",
            "GPU type",
        ),
        ({"options": SlurmOptions(account="ml research")}, "slurm.account", "account"),
        ({"options": SlurmOptions(qos="a,b")}, "slurm.qos", "QOS"),
        ({"options": SlurmOptions(constraint="a b")}, "slurm.constraint", "feature"),
        ({"options": SlurmOptions(reservation="r;x")}, "slurm.reservation", "reservation"),
        ({"options": SlurmOptions(mem="1.5G")}, "slurm.mem", "memory"),
        ({"options": SlurmOptions(mem="-1")}, "slurm.mem", "memory"),
        ({"options": SlurmOptions(cpus_per_task=0)}, "slurm.cpus_per_task", ">= 1"),
        (
            {"options": SlurmOptions(extra_args=("--account=ml",))},
            "slurm.extra_args[0]",
            "field for --account",
        ),
        (
            {"options": SlurmOptions(extra_args=("--hold", "--parti=gpu"))},
            "slurm.extra_args[1]",
            "field for --partition",
        ),
        (
            {"options": SlurmOptions(extra_args=("--gres=gpu:8",))},
            "slurm.extra_args[0]",
            "GPUs are asked for",
        ),
        (
            {"options": SlurmOptions(extra_args=("--gpus-per-node=8",))},
            "slurm.extra_args[0]",
            "field for --gpus-per-node",
        ),
        ({"options": SlurmOptions(extra_args=("--comment two",))}, "slurm.extra_args[0]", "long"),
        ({"options": SlurmOptions(extra_args=("--",))}, "slurm.extra_args[0]", "long"),
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
        options=SlurmOptions(extra_args=("--hold", "--gres=nvme:1", "--gpus=16")),
    )
    assert script.text.rstrip().endswith("--storage s3://bucket/trainctl")
    assert "#SBATCH --hold\n#SBATCH --gres=nvme:1\n#SBATCH --gpus=16\n" in script.text
    assert shlex.split(script.describe().splitlines()[0])[1:] == list(script.argv)
