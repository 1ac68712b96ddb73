"""Errors that say what to do, through the real CLI in a subprocess: each storage failure
against a real S3 endpoint (moto on 127.0.0.1, port 0), each bad storage root, each recipe
mistake is one message and a fix (no traceback, no credential), with its documented exit code.

The exact text of each is a golden file in tests/golden/errors/ (temp paths and the endpoint
replaced by <tmp> and <moto>); regenerate after a deliberate change with
TRAINCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, S3Endpoint
from trainctl.exitcodes import ExitCode

GOLDEN = REPO / "tests" / "golden" / "errors"
SECRET = "s3cr3t-never-to-be-shown"
COMMAND_TIMEOUT_S = 30
"""A command that hangs instead of giving up within its storage timeout is killed here."""


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def _trainctl(*args: str, env: dict[str, str]) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "trainctl.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=REPO,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """No AWS_* and no TRAINCTL_* from the outside; no shared config, no instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINCTL_"))}
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        NO_COLOR="1",
        COLUMNS="80",
        TERM="dumb",
        HOME=str(home),
        PYTHONPATH=str(REPO),
        AWS_CONFIG_FILE=str(home / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


def _with_credentials(env: dict[str, str], endpoint: str) -> dict[str, str]:
    return {
        **env,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
    }


def check_error(
    run: Run,
    code: ExitCode,
    golden: str,
    replace: dict[str, str],
    *,
    num_lines: int = 2,
    secrets: tuple[str, ...] = (),
) -> str:
    """`run` failed with `code` and one message (its ``error:`` line and its ``fix:`` line),
    no traceback, no credential; the message (`replace`d) equals the golden file `golden`."""
    assert run.returncode == int(code), run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    for secret in (SECRET, *secrets):
        assert secret not in run.stderr
    text = run.stderr
    for old, new in replace.items():
        text = text.replace(old, new)
    lines = text.splitlines()
    assert len(lines) == num_lines and lines[0].startswith("error: "), text
    assert lines[-1].lstrip().startswith("fix: "), text
    path = GOLDEN / golden
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()
    return text


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers (a hung proxy, a dead host
    behind a load balancer): only a timeout ends a request to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


# -- S3 ------------------------------------------------------------------------------------------


def test_no_credentials(s3: S3Endpoint, base_env: dict[str, str]) -> None:
    env = {**base_env, "AWS_ENDPOINT_URL": s3.url}
    run = _trainctl("list", "--storage", s3.root("p"), env=env)
    text = check_error(run, ExitCode.BAD_INPUT, "s3-no-credentials.txt", {})
    assert "s3://trainctl-test/p" in text and "AWS_ACCESS_KEY_ID" in text


def test_unreachable_endpoint_fails_within_the_storage_timeout(base_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {**_with_credentials(base_env, endpoint), "TRAINCTL_STORAGE_TIMEOUT_S": "2"}
    run = _trainctl("list", "--storage", "s3://bucket/p", env=env)
    check_error(run, ExitCode.STORAGE_UNREACHABLE, "s3-unreachable.txt", {})


def test_silent_endpoint_is_given_up_on_within_the_storage_timeout(
    base_env: dict[str, str], silent_endpoint: str
) -> None:
    """Connected, then nothing: without a bound this waits for botocore's 60 s read timeout
    times its retries; with TRAINCTL_STORAGE_TIMEOUT_S=2 it ends long before the test's 30 s."""
    env = {**_with_credentials(base_env, silent_endpoint), "TRAINCTL_STORAGE_TIMEOUT_S": "2"}
    for command in (["list"], ["status", "some-job"], ["ckpt", "ls", "some-job"]):
        run = _trainctl(*command, "--storage", "s3://bucket/p", env=env)
        check_error(run, ExitCode.STORAGE_UNREACHABLE, "s3-unreachable.txt", {})


def test_bad_storage_timeout_is_bad_input(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {**base_env, "TRAINCTL_STORAGE_TIMEOUT_S": "soon"}
    run = _trainctl("list", "--storage", str(tmp_path), env=env)
    check_error(run, ExitCode.BAD_INPUT, "storage-timeout-bad.txt", {})


def test_bad_bucket_name(s3: S3Endpoint, base_env: dict[str, str]) -> None:
    env = _with_credentials(base_env, s3.url)
    run = _trainctl("list", "--storage", "s3://Bad_Bucket!!/x", env=env)
    check_error(run, ExitCode.BAD_INPUT, "s3-bad-bucket-name.txt", {})


def test_missing_bucket_is_an_error_not_an_empty_list(
    s3: S3Endpoint, base_env: dict[str, str]
) -> None:
    env = _with_credentials(base_env, s3.url)
    for command in (["list"], ["status", "some-job"], ["ckpt", "ls", "some-job"]):
        run = _trainctl(*command, "--storage", "s3://no-such-bucket/p", env=env)
        text = check_error(run, ExitCode.BAD_INPUT, "s3-missing-bucket.txt", {})
        assert "'no-such-bucket'" in text


def test_existing_bucket_without_jobs_is_still_fine(
    s3: S3Endpoint, base_env: dict[str, str]
) -> None:
    run = _trainctl("list", "--storage", s3.root("p"), env=_with_credentials(base_env, s3.url))
    assert run.returncode == 0, run.stderr


@dataclass(frozen=True)
class LockedEndpoint:
    url: str
    bucket: str
    key_id: str
    secret: str


@pytest.fixture(scope="module")
def locked_s3() -> Iterator[LockedEndpoint]:
    """A moto server (its own process) that enforces IAM, with one bucket and one user allowed
    nothing on it. moto authenticates every request after the first INITIAL_NO_AUTH_ACTION_COUNT,
    which set the endpoint up."""
    import boto3

    script = (
        "import sys\n"
        "from moto.server import ThreadedMotoServer\n"
        "server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "server.start()\n"
        "print('%s:%d' % server.get_host_and_port(), flush=True)\n"
        "sys.stdin.read()\n"
        "server.stop()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = "http://" + process.stdout.readline().strip()
        setup = {
            "endpoint_url": url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        boto3.client("s3", **setup).create_bucket(Bucket="locked")  # 1
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="oncall")  # 2
        key = iam.create_access_key(UserName="oncall")["AccessKey"]  # 3
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::other/*"}
            ],
        }
        iam.put_user_policy(  # 4: from here on every request is authenticated
            UserName="oncall", PolicyName="nothing-here", PolicyDocument=json.dumps(policy)
        )
        yield LockedEndpoint(url, "locked", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        if process.stdin:
            process.stdin.close()
        process.wait(timeout=30)


def test_access_denied(locked_s3: LockedEndpoint, base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "AWS_ENDPOINT_URL": locked_s3.url,
        "AWS_ACCESS_KEY_ID": locked_s3.key_id,
        "AWS_SECRET_ACCESS_KEY": locked_s3.secret,
    }
    run = _trainctl("list", "--storage", "s3://locked/p", env=env)
    text = check_error(
        run, ExitCode.BAD_INPUT, "s3-access-denied.txt", {}, secrets=(locked_s3.secret,)
    )
    assert locked_s3.key_id not in text


def test_rejected_credentials(locked_s3: LockedEndpoint, base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "AWS_ENDPOINT_URL": locked_s3.url,
        "AWS_ACCESS_KEY_ID": locked_s3.key_id,
        "AWS_SECRET_ACCESS_KEY": SECRET,  # not this key's secret
    }
    run = _trainctl("list", "--storage", "s3://locked/p", env=env)
    text = check_error(run, ExitCode.BAD_INPUT, "s3-rejected-credentials.txt", {})
    assert locked_s3.key_id not in text


# -- storage roots and jobs ----------------------------------------------------------------------


def test_s3_url_with_one_slash_is_refused(base_env: dict[str, str]) -> None:
    run = _trainctl("list", "--storage", "s3:/bucket", env=base_env)
    text = check_error(run, ExitCode.BAD_INPUT, "s3-one-slash.txt", {})
    assert "did you mean s3://bucket?" in text


def test_missing_local_root_is_an_error_except_for_launch(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    replace = {str(tmp_path): "<tmp>"}
    for command in (["list"], ["status", "job-1"], ["events", "job-1"], ["ckpt", "ls", "job-1"]):
        run = _trainctl(*command, "--storage", str(missing), env=base_env)
        check_error(run, ExitCode.BAD_INPUT, "local-root-missing.txt", replace)
    (tmp_path / "train.py").write_text("print('hi')\n")
    launched = _trainctl(
        "launch", str(tmp_path / "train.py"), "--dry-run", "--storage", str(missing), env=base_env
    )
    assert launched.returncode == 0, launched.stderr


def test_ckpt_ls_of_an_unknown_job(base_env: dict[str, str], tmp_path: Path) -> None:
    run = _trainctl("ckpt", "ls", "nosuchjob", "--storage", str(tmp_path), env=base_env)
    check_error(run, ExitCode.BAD_INPUT, "ckpt-ls-no-such-job.txt", {str(tmp_path): "<tmp>"})


# -- recipes -------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    path = tmp_path / "job.yaml"
    path.write_text("script: train.py\n" + text)
    return path


def _dry_run(base_env: dict[str, str], tmp_path: Path, recipe: Path) -> Run:
    return _trainctl("launch", str(recipe), "--dry-run", "--storage", str(tmp_path), env=base_env)


def test_recipe_with_two_typos_reports_both(base_env: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "chekpoint: {interval_steps: 5}\ncheckpoint:\n  interval_step: 10\n")
    run = _dry_run(base_env, tmp_path, recipe)
    text = check_error(
        run, ExitCode.BAD_INPUT, "recipe-two-typos.txt", {str(tmp_path): "<tmp>"}, num_lines=5
    )
    assert "did you mean `checkpoint`?" in text
    assert "did you mean `checkpoint.interval_steps`?" in text


def test_huge_seed_is_refused_at_validation(base_env: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "seed: 1000000000000000000000000000000\n")
    run = _dry_run(base_env, tmp_path, recipe)
    text = check_error(run, ExitCode.BAD_INPUT, "recipe-huge-seed.txt", {str(tmp_path): "<tmp>"})
    assert "from 0 to 4294967295" in text


def test_min_nodes_over_nodes_in_our_words(base_env: dict[str, str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "nodes: 2\nmin_nodes: 3\n")
    run = _dry_run(base_env, tmp_path, recipe)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    text = run.stderr.replace(str(tmp_path), "<tmp>")
    assert text.startswith("error: <tmp>/job.yaml: min_nodes (3) cannot exceed nodes (2)")
    assert "Value error" not in text and "{" not in text  # no pydantic prefix, no whole dict
    check_error(run, ExitCode.BAD_INPUT, "recipe-min-nodes.txt", {str(tmp_path): "<tmp>"})


def test_ambiguous_job_prefix_names_the_matches(base_env: dict[str, str], tmp_path: Path) -> None:
    from trainctl.state import JobRecord
    from trainctl.store import JobStore

    store = JobStore(str(tmp_path))
    for job in ("train-a", "train-b"):
        store.create(JobRecord(job_id=job, name="t", created_at=1.0, updated_at=1.0), "name: t\n")
    run = _trainctl("status", "train-", "--storage", str(tmp_path), env=base_env)
    text = check_error(run, ExitCode.BAD_INPUT, "ambiguous-prefix.txt", {})
    assert "2 jobs match: train-a, train-b" in text


def test_checkpoint_storage_that_does_not_answer_fails_within_the_storage_timeout(
    base_env: dict[str, str], tmp_path: Path, silent_endpoint: str
) -> None:
    """The job store answers (local), its checkpoints' endpoint does not: `ckpt ls/verify/gc`
    give up within TRAINCTL_STORAGE_TIMEOUT_S with the store's one message and exit 6, where
    the checkpoint backend's own retries (5 attempts, 60 s reads) took minutes."""
    job = tmp_path / "jobs" / "j1"
    job.mkdir(parents=True)
    (job / "spec.yaml").write_text(
        "name: x\nscript: t.py\ncheckpoint:\n  storage: s3://bucket/ck\n  interval_steps: 5\n"
        f"  storage_options:\n    endpoint_url: {silent_endpoint}\n"
    )
    env = {**_with_credentials(base_env, silent_endpoint), "TRAINCTL_STORAGE_TIMEOUT_S": "1"}
    for command in ("ls", "verify", "gc"):
        run = _trainctl("ckpt", command, "j1", "--storage", str(tmp_path), env=env)
        check_error(run, ExitCode.STORAGE_UNREACHABLE, "ckpt-s3-unreachable.txt", {})
