"""Recipe validation: every bad input names file, field, value and fix; nothing starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from trainctl.errors import UserError
from trainctl.exitcodes import ExitCode
from trainctl.recipe import (
    load_recipe,
    restore_secrets,
    script_spec,
    spec_from_yaml,
    spec_to_yaml,
)
from trainctl.spec import check_job_id, check_storage_url
from trainctl.store import resolve_storage_root


def write_recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_load() -> None:
    for name in ("tiny-gpt", "dcnv2"):
        spec = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert spec.name == name
        assert Path(spec.script).is_file()
        assert spec.nodes == 2 and spec.checkpoint.keep_last >= 2


def test_overrides_apply_and_defaults_fill(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "script: train.py\n")
    spec = load_recipe(path, {"nodes": 3, "nproc_per_node": None, "max_steps": 7})
    assert spec.nodes == 3 and spec.nproc_per_node == 1 and spec.max_steps == 7
    assert spec.name == "job" and spec.script == str((tmp_path / "train.py").resolve())
    assert spec.world_size == 3


BAD_RECIPES = [
    ("script: train.py\nnodez: 2\n", "job.yaml: nodez", "unknown field", "did you mean `nodes`?"),
    ("script: train.py\nnodes: two\n", "job.yaml: nodes", "not a whole number", "right type"),
    ("script: train.py\nnodes: 0\n", "job.yaml: nodes", "out of range (got 0)", "from 1 to 4096"),
    (
        "script: train.py\ncheckpoint:\n  keep_last: 1\n",
        "job.yaml: checkpoint.keep_last",
        "out of range (got 1)",
        "use a value from 2 to 100000",
    ),
    (
        "script: train.py\ncheckpoint:\n  memory:\n    slots: 3\n",
        "job.yaml: checkpoint.memory.slots",
        "out of range (got 3)",
        "use a value from 1 to 2",
    ),
    (
        "script: train.py\ncheckpoint:\n  memory:\n    slots: one\n",
        "job.yaml: checkpoint.memory.slots",
        "not a whole number",
        "",
    ),
    (
        "script: train.py\ncheckpoint:\n  storage: gs://b/x\n",
        "storage",
        "unsupported storage scheme",
        "s3://bucket/prefix",
    ),
    ("script: missing.py\n", "job.yaml: script", "training script not found", "missing.py"),
    ("nodes: 2\n", "job.yaml: script", "required field missing", "add the field"),
    ("script: train.py\nnodes: [2\n", "job.yaml:3:1", "malformed YAML", "fix the YAML"),
    ("- a\n- b\n", "job.yaml", "must be a YAML mapping", "key: value"),
    ("script: train.py\nnodes: 2\nmin_nodes: 3\n", "job.yaml", "min_nodes (3) cannot exceed", ""),
    (
        "script: train.py\nenv:\n  BAD-NAME: x\n",
        "job.yaml: env",
        "invalid environment variable",
        "",
    ),
]


@pytest.mark.parametrize(("text", "where", "problem", "detail"), BAD_RECIPES)
def test_bad_recipes_raise_one_clear_user_error(
    tmp_path: Path, text: str, where: str, problem: str, detail: str
) -> None:
    path = write_recipe(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert where in message and problem in message and detail in message
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("job_id", ["a", "job-1", "x.y_z", "A" * 64])
def test_good_job_ids(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", "a..b", ".hidden", "-x", "A" * 65, "a b"])
def test_bad_job_ids(job_id: str) -> None:
    with pytest.raises(UserError, match="invalid job id"):
        check_job_id(job_id)


@pytest.mark.parametrize("url", ["/abs", "rel/path", "file:///abs", "s3://bucket", "s3://b/p/q"])
def test_good_storage_urls(url: str) -> None:
    assert check_storage_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("gs://b", "unsupported storage scheme"),
        ("s3://", "no bucket"),
        ("file://rel", "must be absolute"),
        ("  ", "empty storage path"),
    ],
)
def test_bad_storage_urls(url: str, problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        check_storage_url(url)


def test_storage_root_resolution_order(tmp_path: Path) -> None:
    assert resolve_storage_root(str(tmp_path / "a"), {}) == str(tmp_path / "a")
    assert resolve_storage_root(None, {"TRAINCTL_STORAGE": f"file://{tmp_path}/b/"}) == str(
        tmp_path / "b"
    )
    assert resolve_storage_root(None, {"TRAINCTL_STORAGE": "s3://bkt/p/"}) == "s3://bkt/p"
    assert resolve_storage_root(None, {}).endswith(".trainctl")
    with pytest.raises(UserError, match="TRAINCTL_STORAGE"):
        resolve_storage_root(None, {"TRAINCTL_STORAGE": "ftp://x"})


def test_script_spec(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("")
    spec = script_spec(str(script), ["--a", "b c"], {"nodes": 2})
    assert spec.args == ("--a", "b c") and spec.nodes == 2 and not spec.uses_runtime
    with pytest.raises(UserError, match="training script not found"):
        script_spec(str(tmp_path / "nope.py"), [], {})


def test_health_section_and_node_env(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        "script: train.py\nnodes: 2\nhealth:\n  hang_timeout_s: 5\n  straggler_factor: 1.5\n"
        "node_env:\n  node-1: {FAKE_NVML_FILE: /x}\n",
    )
    spec = load_recipe(path)
    assert spec.health.hang_timeout_s == 5 and spec.health.straggler_factor == 1.5
    assert spec.node_env == {"node-1": {"FAKE_NVML_FILE": "/x"}}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("health:\n  straggler_factor: 1.0\n", "job.yaml: health.straggler_factor"),
        ("health:\n  hang_timeout_s: 0\n", "job.yaml: health.hang_timeout_s"),
        ("health:\n  probe_every: 3\n", "job.yaml: health.probe_every"),
        ("node_env:\n  node-7: {A: b}\n", "job.yaml"),
    ],
)
def test_bad_health_and_node_env(tmp_path: Path, text: str, where: str) -> None:
    path = write_recipe(tmp_path, "script: train.py\nnodes: 2\n" + text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert where in str(info.value)


SECRET = "sk-live-0123456789abcdef"


def test_credential_env_moves_to_secrets_and_is_never_stored_or_quoted(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "name: s\nscript: train.py\n"
        f"env: {{WANDB_API_KEY: {SECRET}, TOKENIZERS_PARALLELISM: 'false'}}\n"
        "checkpoint: {storage: s3://b/p, storage_options: "
        f"{{endpoint_url: 'http://h:1', key: AKIA1, secret: {SECRET}, "
        "client_kwargs: {aws_session_token: tok-123456}}}\n",
    )
    spec = load_recipe(recipe)
    assert spec.env == {"TOKENIZERS_PARALLELISM": "false"}
    assert spec.secrets == {"WANDB_API_KEY": SECRET}
    secrets = spec.job_secrets()
    assert secrets.env == {"WANDB_API_KEY": SECRET}
    assert secrets.storage_options == {
        "key": "AKIA1",
        "secret": SECRET,
        "client_kwargs": {"aws_session_token": "tok-123456"},
    }
    stored = spec_to_yaml(spec)
    for value in (SECRET, "AKIA1", "tok-123456"):
        assert value not in stored
    assert "endpoint_url: http://h:1" in stored and "source:" in stored
    reloaded = spec_from_yaml(stored, "spec.yaml")
    restored, missing = restore_secrets(reloaded, {})
    assert missing == [] and restored.job_secrets().env == secrets.env
    assert restored.checkpoint.storage_options == spec.checkpoint.storage_options


def test_secrets_come_back_from_the_environment_when_the_recipe_is_gone(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"name: s\nscript: train.py\nsecrets: {{HF_TOKEN: {SECRET}}}\n")
    stored = spec_from_yaml(spec_to_yaml(load_recipe(recipe)), "spec.yaml")
    recipe.unlink()
    restored, missing = restore_secrets(stored, {"HF_TOKEN": "from-the-shell"})
    assert missing == [] and restored.secrets == {"HF_TOKEN": "from-the-shell"}
    bare, missing = restore_secrets(stored, {})
    assert missing == ["HF_TOKEN"] and bare.secrets == {}


@pytest.mark.parametrize(
    "text",
    [
        # a model-level error: pydantic's input is the whole recipe, secrets included
        f"name: s\nscript: train.py\nnodes: 2\nmin_nodes: 3\nenv: {{API_TOKEN: {SECRET}}}\n",
        f"name: s\nscript: train.py\nsecrets: {{API_TOKEN: [{SECRET}]}}\n",
        f"name: s\nscript: train.py\ncheckpoint: {{storage_options: {{secret: {SECRET}}}, x: 1}}\n",
    ],
)
def test_errors_never_quote_a_secret(tmp_path: Path, text: str) -> None:
    with pytest.raises(UserError) as raised:
        load_recipe(write_recipe(tmp_path, text))
    assert SECRET not in str(raised.value)


def test_a_spec_stored_by_the_previous_release_keeps_its_values() -> None:
    """Earlier releases stored secrets in clear: resuming such a job must not lose them."""
    old = (
        "name: s\nscript: /x.py\nenv: {HF_TOKEN: tok-123456, OTHER: x}\n"
        "checkpoint: {storage_options: {endpoint_url: 'http://h:1', secret: s3cr3t-value}}\n"
    )
    restored, missing = restore_secrets(spec_from_yaml(old, "spec.yaml"), {})
    assert missing == [] and restored.secrets == {"HF_TOKEN": "tok-123456"}
    assert restored.checkpoint.storage_options == {
        "endpoint_url": "http://h:1",
        "secret": "s3cr3t-value",
    }
