"""The pure parts of "errors that say what to do": translating botocore/s3fs failures, several
recipe problems in one error, did-you-mean and bounds, the storage timeout setting."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from trainctl.errors import (
    StorageError,
    StorageSetupError,
    StorageUnreachableError,
    UserError,
    UserErrors,
    one_or_all,
)
from trainctl.exitcodes import ExitCode
from trainctl.recipe import load_recipe
from trainctl.spec import MAX_SEED, check_storage_url
from trainctl.storage_errors import DEFAULT_TIMEOUT_S, storage_timeout_s, translate

URL = "s3://bucket/prefix"


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "ListObjectsV2")


def _wrapped(code: str) -> OSError:
    """What s3fs raises for a ClientError: an OSError whose cause is botocore's error."""
    try:
        raise PermissionError(code) from _client_error(code)
    except OSError as error:
        return error


@pytest.mark.parametrize(
    ("error", "kind", "code", "words"),
    [
        (NoCredentialsError(), StorageSetupError, ExitCode.BAD_INPUT, "no credentials"),
        (
            EndpointConnectionError(endpoint_url="http://x"),
            StorageUnreachableError,
            ExitCode.STORAGE_UNREACHABLE,
            "did not answer within 5 s",
        ),
        (
            ReadTimeoutError(endpoint_url="http://x"),
            StorageUnreachableError,
            ExitCode.STORAGE_UNREACHABLE,
            "did not answer",
        ),
        (TimeoutError(), StorageUnreachableError, ExitCode.STORAGE_UNREACHABLE, "did not answer"),
        (_wrapped("AccessDenied"), StorageSetupError, ExitCode.BAD_INPUT, "access denied"),
        (_client_error("NoSuchBucket"), StorageSetupError, ExitCode.BAD_INPUT, "does not exist"),
        (_wrapped("InvalidAccessKeyId"), StorageSetupError, ExitCode.BAD_INPUT, "rejects"),
        (
            ParamValidationError(report='Invalid bucket name "B!"'),
            StorageSetupError,
            ExitCode.BAD_INPUT,
            "not a valid bucket name",
        ),
    ],
)
def test_storage_failures_are_translated(
    error: Exception, kind: type[StorageError], code: ExitCode, words: str
) -> None:
    translated = translate(error, URL, timeout_s=5)
    assert isinstance(translated, kind) and translated.exit_code is code
    text = str(translated)
    assert text.startswith(f"{URL}: ") and words in text and "\n  fix: " in text


def test_other_failures_are_left_to_the_caller() -> None:
    assert translate(FileNotFoundError("x"), URL) is None  # a missing object: the caller's
    assert translate(ValueError("bug"), URL) is None
    already = StorageError("cannot write it", url=URL)
    assert translate(already, URL) is already


def test_storage_error_survives_pickling() -> None:
    """DCP sends a rank's exception to every rank by pickle."""
    error = StorageUnreachableError("the storage endpoint did not answer", url=URL, fix="retry")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is StorageUnreachableError and str(copy) == str(error)


def test_storage_timeout_setting() -> None:
    assert storage_timeout_s({}) == DEFAULT_TIMEOUT_S
    assert storage_timeout_s({"TRAINCTL_STORAGE_TIMEOUT_S": "2.5"}) == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(UserError):
            storage_timeout_s({"TRAINCTL_STORAGE_TIMEOUT_S": bad})


def test_user_errors_render_every_problem() -> None:
    first = UserError("unknown field", where="r.yaml: a", value=1, fix="did you mean `b`?")
    second = UserError("out of range", where="r.yaml: seed", value=-1, fix="use 0 to 9")
    both = one_or_all([first, second], where="r.yaml")
    assert isinstance(both, UserErrors) and both.exit_code is ExitCode.BAD_INPUT
    assert str(both).splitlines() == [
        "r.yaml: 2 problems",
        "  r.yaml: a: unknown field (got 1)",
        "    fix: did you mean `b`?",
        "  r.yaml: seed: out of range (got -1)",
        "    fix: use 0 to 9",
    ]
    assert one_or_all([first]) is first


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("s3:/bucket/p", "did you mean s3://bucket/p?"),
        ("file:/abs/x", "did you mean file:///abs/x?"),
    ],
)
def test_url_missing_a_slash_is_refused(url: str, fix: str) -> None:
    with pytest.raises(UserError) as raised:
        check_storage_url(url, where="--storage")
    assert raised.value.fix == fix


def _recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.py").write_text("")
    path = tmp_path / "r.yaml"
    path.write_text("script: train.py\n" + text)
    return path


@pytest.mark.parametrize(
    ("text", "field", "suggestion"),
    [
        ("chekpoint: {}\n", "chekpoint", "checkpoint"),
        (
            "checkpoint: {interval_step: 5}\n",
            "checkpoint.interval_step",
            "checkpoint.interval_steps",
        ),
        ("interval_steps: 5\n", "interval_steps", "checkpoint.interval_steps"),
        ("health: {hang_timout_s: 5}\n", "health.hang_timout_s", "health.hang_timeout_s"),
        ("slurm: {partiton: gpu}\n", "slurm.partiton", "slurm.partition"),
    ],
)
def test_unknown_fields_get_a_did_you_mean(
    tmp_path: Path, text: str, field: str, suggestion: str
) -> None:
    with pytest.raises(UserError) as raised:
        load_recipe(_recipe(tmp_path, text))
    assert raised.value.where == f"{tmp_path / 'r.yaml'}: {field}"
    assert raised.value.fix == f"did you mean `{suggestion}`?"


def test_every_problem_is_reported_secrets_redacted(tmp_path: Path) -> None:
    text = "nodez: 2\nseed: -1\nsecrets: {HF_TOKEN: [hunter2]}\nlaunch: {max_restarts: x}\n"
    with pytest.raises(UserErrors) as raised:
        load_recipe(_recipe(tmp_path, text))
    fields = [problem.where.rsplit(": ", 1)[-1] for problem in raised.value.problems]
    assert sorted(fields) == ["launch.max_restarts", "nodez", "secrets.HF_TOKEN", "seed"]
    assert "hunter2" not in str(raised.value) and "Input should" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (f"seed: {MAX_SEED + 1}\n", "seed"),
        ("max_steps: 1000000000000\n", "max_steps"),
        ("checkpoint: {interval_steps: 10000000000}\n", "checkpoint.interval_steps"),
        ("health: {hang_timeout_s: .inf}\n", "health.hang_timeout_s"),
        ("launch: {join_timeout_s: .nan}\n", "launch.join_timeout_s"),
    ],
)
def test_values_a_worker_would_die_on_are_refused(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(UserError) as raised:
        load_recipe(_recipe(tmp_path, text))
    assert raised.value.where == f"{tmp_path / 'r.yaml'}: {field}"


def test_largest_seed_is_accepted(tmp_path: Path) -> None:
    assert load_recipe(_recipe(tmp_path, f"seed: {MAX_SEED}\n")).seed == MAX_SEED
