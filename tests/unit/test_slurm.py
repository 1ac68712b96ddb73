"""The pure parts of the Slurm adapter: the srun command, squeue parsing, the state table.

The commands themselves run against a real cluster in tests/slurm.
"""

from __future__ import annotations

import pytest

from trainctl.launch.slurm import (
    SLURM_STATE_MEANING,
    SlurmClient,
    SlurmError,
    SlurmJobView,
    SlurmRequestRefused,
    parse_job_line,
    refused_request,
    state_meaning,
)
from trainctl.launch.slurm_nodes import srun_argv

HOSTNAMES = {"n[1-2]": ["n1", "n2"], "n3": ["n3"]}
"""What `scontrol show hostnames` prints for the lists below."""


def test_srun_argv_runs_one_task_on_one_node_beside_other_steps() -> None:
    argv = srun_argv("42", "gpu07", ["/opt/venv/bin/python", "-m", "trainctl.launch.agent", "a b"])
    assert argv == [
        "srun",
        "--jobid=42",
        "--nodes=1",
        "--ntasks=1",
        "--nodelist=gpu07",
        "--overlap",
        "--kill-on-bad-exit=0",
        "--export=ALL",
        "--mpi=none",
        "--job-name=trainctl-agent-gpu07",
        "/opt/venv/bin/python",
        "-m",
        "trainctl.launch.agent",
        "a b",
    ]


def test_parse_running_job_line() -> None:
    view = parse_job_line("7", "RUNNING|n3|n[1-2]|n1|None|tiny-gpt\n", 1, HOSTNAMES.__getitem__)
    assert view == SlurmJobView(
        slurm_job_id="7",
        name="tiny-gpt",
        state="RUNNING",
        reason="None",
        nodes=("n1", "n2"),
        exc_nodes=("n3",),
        restart_count=1,
        batch_host="n1",
    )
    assert view.describe() == "RUNNING on n1,n2 (restart 1): running on its allocation"


def test_parse_pending_job_line_keeps_a_name_with_the_separator() -> None:
    line = "PENDING|||n/a|ReqNodeNotAvail, UnavailableNodes:n2|a|b JobState=X"
    view = parse_job_line("8", line, 0, HOSTNAMES.__getitem__)
    assert view.name == "a|b JobState=X"
    assert (view.state, view.nodes, view.exc_nodes, view.batch_host) == ("PENDING", (), (), None)
    assert view.reason == "ReqNodeNotAvail, UnavailableNodes:n2"
    assert view.describe() == (
        "PENDING: waiting for an allocation (see the reason); "
        "Slurm says: ReqNodeNotAvail, UnavailableNodes:n2"
    )


def test_state_table_covers_the_states_squeue_documents() -> None:
    documented = {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED",
        "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD",
        "REQUEUE_FED", "REQUEUE_HOLD", "REQUEUED", "RESIZING", "REVOKED", "SIGNALING",
        "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED", "TIMEOUT",
    }  # fmt: skip
    assert set(SLURM_STATE_MEANING) == documented
    ended = {state for state, meaning in SLURM_STATE_MEANING.items() if not meaning.active}
    assert ended == {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
        "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
    }  # fmt: skip
    unknown = state_meaning("LAUNCH_FAILED")
    assert unknown.active and "unknown" in unknown.summary


def test_missing_commands_and_failures_are_slurm_errors() -> None:
    client = SlurmClient(env={"PATH": "/nonexistent"})
    with pytest.raises(SlurmError, match="not installed"):
        client.run(["squeue"])
    with pytest.raises(SlurmError) as raised:
        SlurmClient().run(["sh", "-c", "echo 'sbatch: error: Invalid partition' >&2; exit 1"])
    assert raised.value.stderr == "sbatch: error: Invalid partition"
    assert "exit code 1" in str(raised.value)
    with pytest.raises(SlurmError, match=r"did not answer within 0\.2 s"):
        SlurmClient(timeout_s=0.2).run(["sleep", "5"])


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (
            "allocation failure: Requested node configuration is not available\n",
            "Requested node configuration is not available",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is not "
            "available\n",
            "Requested node configuration is not available",
        ),
        (
            "sbatch: error: invalid partition specified: nope\n"
            "allocation failure: Invalid partition name specified\n",
            "Invalid partition name specified",
        ),
        (
            "allocation failure: Requested reservation is invalid",
            "Requested reservation is invalid",
        ),
        ("sbatch: error: Invalid --mem specification\n", "Invalid --mem specification"),
        # Slurm could not be asked: not a refusal of the request, a retry may help.
        (
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller "
            "(connect failure)\n",
            None,
        ),
        ("sbatch: error: Socket timed out on send/recv operation\n", None),
        ("", None),
        ("Segmentation fault\n", None),
    ],
)
def test_refused_request_tells_a_refusal_from_an_outage(stderr: str, reason: str | None) -> None:
    assert refused_request(stderr) == reason


def test_a_refused_request_is_bad_input() -> None:
    error = SlurmRequestRefused("Requested node configuration is not available")
    assert error.exit_code == 2
    assert "Requested node configuration is not available" in error.render()
    assert "sinfo" in (error.fix or "")
