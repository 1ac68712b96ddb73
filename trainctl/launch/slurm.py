"""The Slurm adapter: the real sbatch, squeue, scontrol, scancel and srun, and nothing else.

Every command runs as an argv list (never through a shell) under a timeout; a failure raises
`SlurmError` carrying the command and its stderr. What Slurm reports is turned into data here
(`SlurmJobView`) and read through one table, `SLURM_STATE_MEANING`; deciding what to do about
it is the controller's business.

Node agents as job steps (`srun`) are in `trainctl.launch.slurm_nodes`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from trainctl.errors import TrainctlError, UserError
from trainctl.exitcodes import ExitCode
from trainctl.launch.sbatch import SbatchScript

DEFAULT_TIMEOUT_S = 30.0
"""How long one Slurm command may take: slurmctld answers in milliseconds unless it is sick."""


class SlurmError(TrainctlError):
    """A Slurm command failed or timed out. Retry may help (exit code 1)."""

    exit_code = ExitCode.FAILED

    def __init__(self, argv: Sequence[str], problem: str, stderr: str = "") -> None:
        self.argv = list(argv)
        self.problem = problem
        self.stderr = stderr.strip()
        message = f"`{' '.join(self.argv)}` {problem}"
        if self.stderr:
            message += f": {self.stderr}"
        super().__init__(message)


REFUSALS = (
    "allocation failure:",
    "Batch job submission failed:",
    "invalid partition specified",
    "Invalid --",
    "Invalid generic resource",
    "Invalid feature specification",
    "Invalid account",
    "Invalid qos",
    "Requested reservation is invalid",
)
"""How sbatch 22.05 says that it will not take a request (as opposed to: cannot be reached)."""
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused")


class SlurmRequestRefused(UserError):
    """Slurm will not take the job's request as it stands: fix the request (exit code 2;
    resubmitting the same request would be refused again)."""

    def __init__(self, slurm_says: str) -> None:
        super().__init__(
            f"Slurm refuses the job's request: {slurm_says}",
            where="the slurm: section and launch flags",
            fix="ask for what the cluster has (`sinfo -o '%P %D %G %f'` lists partitions, "
            "GPUs and features; `scontrol show reservation` the reservations); "
            "`trainctl launch ... --dry-run` shows the request",
        )
        self.slurm_says = slurm_says


def refused_request(stderr: str) -> str | None:
    """sbatch's reason for refusing a request (its last line), or None when its stderr says
    something else (Slurm unreachable, a crash): then a retry may help."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines or any(marker in stderr for marker in UNREACHABLE):
        return None
    if not any(marker in stderr for marker in REFUSALS):
        return None
    reason = lines[-1]
    for prefix in ("allocation failure: ", "sbatch: error: ", "Batch job submission failed: "):
        reason = reason.removeprefix(prefix)
    return reason


def _refusal_or(error: SlurmError) -> TrainctlError:
    refusal = refused_request(error.stderr)
    return error if refusal is None else SlurmRequestRefused(refusal)


@dataclasses.dataclass(frozen=True)
class SlurmStateMeaning:
    """What a Slurm job state tells on-call, and whether the job still holds or awaits nodes."""

    summary: str
    active: bool
    """True while Slurm will still run (or is running) the job: pending, running, requeueing."""


SLURM_STATE_MEANING: dict[str, SlurmStateMeaning] = {
    "PENDING": SlurmStateMeaning("waiting for an allocation (see the reason)", True),
    "CONFIGURING": SlurmStateMeaning("nodes allocated, being readied (booting)", True),
    "RUNNING": SlurmStateMeaning("running on its allocation", True),
    "COMPLETING": SlurmStateMeaning("ending: Slurm is cleaning up processes on its nodes", True),
    "REQUEUED": SlurmStateMeaning("being requeued: ends now, then waits to run again", True),
    "REQUEUE_HOLD": SlurmStateMeaning(
        "requeued and held: runs again only after `scontrol release`", True
    ),
    "REQUEUE_FED": SlurmStateMeaning("being requeued by the federation", True),
    "RESIZING": SlurmStateMeaning("its allocation is changing size", True),
    "SIGNALING": SlurmStateMeaning("being signalled", True),
    "STAGE_OUT": SlurmStateMeaning("staging out files after running", True),
    "SUSPENDED": SlurmStateMeaning(
        "suspended by Slurm: processes stopped, CPUs given to others", True
    ),
    "STOPPED": SlurmStateMeaning("stopped with SIGSTOP, keeping its CPUs", True),
    "RESV_DEL_HOLD": SlurmStateMeaning("held: its reservation was deleted", True),
    "SPECIAL_EXIT": SlurmStateMeaning(
        "requeued in a special held state after its exit code; needs `scontrol release`", True
    ),
    "COMPLETED": SlurmStateMeaning("ended: the batch script exited 0", False),
    "FAILED": SlurmStateMeaning(
        "ended: the batch script exited non-zero (trainctl's exit code is in the job store)",
        False,
    ),
    "CANCELLED": SlurmStateMeaning("ended: cancelled by a user or an administrator", False),
    "TIMEOUT": SlurmStateMeaning("ended: reached its time limit", False),
    "PREEMPTED": SlurmStateMeaning("ended: preempted by a higher-priority job", False),
    "NODE_FAIL": SlurmStateMeaning(
        "ended: one of its nodes failed (a requeueable job comes back as PENDING)", False
    ),
    "BOOT_FAIL": SlurmStateMeaning("ended: a node failed to boot for it", False),
    "DEADLINE": SlurmStateMeaning("ended: reached its deadline", False),
    "OUT_OF_MEMORY": SlurmStateMeaning("ended: a process ran out of memory", False),
    "REVOKED": SlurmStateMeaning("ended here: another cluster of the federation runs it", False),
}
"""The one table from a Slurm job state (as `squeue -o %T` prints it) to its meaning."""


def state_meaning(state: str) -> SlurmStateMeaning:
    """The meaning of `state`; an unknown state is reported as such, and counted active."""
    known = SLURM_STATE_MEANING.get(state)
    if known is not None:
        return known
    return SlurmStateMeaning(f"state {state} unknown to trainctl: see `scontrol show job`", True)


@dataclasses.dataclass(frozen=True)
class SlurmJobView:
    """Slurm's view of one job, as `squeue` reports it."""

    slurm_job_id: str
    name: str
    state: str
    """The job state, a key of `SLURM_STATE_MEANING` (e.g. PENDING, RUNNING, COMPLETED)."""
    reason: str
    """Why it waits or ended, in Slurm's words ("None" when there is nothing to say)."""
    nodes: tuple[str, ...]
    """The nodes it runs on (or last ran on); empty while pending for the first time."""
    exc_nodes: tuple[str, ...]
    """The nodes it must never run on (`--exclude` / `ExcNodeList`)."""
    restart_count: int
    """How often Slurm requeued it; the batch script sees it as SLURM_RESTART_COUNT."""
    batch_host: str | None
    """The node that runs the batch script (the first node); None while pending."""

    @property
    def meaning(self) -> SlurmStateMeaning:
        return state_meaning(self.state)

    def describe(self) -> str:
        """One line for people: `RUNNING on n1,n2 (restart 1): running on its allocation`."""
        text = self.state
        if self.nodes:
            text += f" on {','.join(self.nodes)}"
        if self.restart_count:
            text += f" (restart {self.restart_count})"
        text += f": {self.meaning.summary}"
        if self.reason and self.reason != "None":
            text += f"; Slurm says: {self.reason}"
        return text


JOB_VIEW_FORMAT = "%T|%x|%N|%B|%r|%j"
"""squeue fields: state, excluded nodes, nodes, batch host, reason, name (last: it may hold |)."""


def parse_job_line(
    slurm_job_id: str, line: str, restart_count: int, hostnames: Callable[[str], list[str]]
) -> SlurmJobView:
    """Build a view from one `squeue --format=JOB_VIEW_FORMAT` line; `hostnames` expands a
    compressed node list (`n[1-2]` -> n1, n2)."""
    state, exc_nodes, nodes, batch_host, reason, name = line.rstrip("\n").split("|", 5)
    return SlurmJobView(
        slurm_job_id=slurm_job_id,
        name=name,
        state=state.strip(),
        reason=reason,
        nodes=tuple(hostnames(nodes)) if _present(nodes) else (),
        exc_nodes=tuple(hostnames(exc_nodes)) if _present(exc_nodes) else (),
        restart_count=restart_count,
        batch_host=batch_host if _present(batch_host) else None,
    )


def _present(value: str) -> bool:
    return value not in ("", "(null)", "n/a", "None")


NODE_ADDR = re.compile(r"(?:^|\s)NodeAddr=(\S+)")
NODE_STATE = re.compile(r"(?:^|\s)State=(\S+)")


@dataclasses.dataclass(frozen=True)
class SlurmClient:
    """The Slurm commands trainctl uses. `env` is added to this process's environment for
    every command (tests point `SLURM_CONF` at their cluster); `timeout_s` bounds each one."""

    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        """Run one command (`stdin`: its input); returns its stdout. Raises `SlurmError` on
        failure or timeout."""
        try:
            result = subprocess.run(
                list(argv),
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                input=stdin,
                stdin=subprocess.DEVNULL if stdin is None else None,
            )
        except FileNotFoundError as error:
            raise SlurmError(
                argv, "cannot run: the Slurm client commands are not installed"
            ) from error
        except subprocess.TimeoutExpired as error:
            raise SlurmError(argv, f"did not answer within {self.timeout_s:g} s") from error
        if result.returncode != 0:
            raise SlurmError(argv, f"failed with exit code {result.returncode}", result.stderr)
        return result.stdout

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, script: SbatchScript) -> str:
        """Write the script to its path and submit it; returns the Slurm job id."""
        path = Path(script.script_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script.text)
        try:
            out = self.run(script.argv).strip()
        except SlurmError as error:
            raise _refusal_or(error) from None
        # --parsable prints "JOBID" or "JOBID;CLUSTER".
        job_id = out.split(";", 1)[0]
        if not job_id.isdigit():
            raise SlurmError(script.argv, f"printed no job id (got {out!r})")
        return job_id

    def test_submit(self, script: SbatchScript) -> None:
        """Ask Slurm whether it could ever run the script's request, submitting nothing
        (`sbatch --test-only`, the script on stdin: nothing is written either). Raises
        `SlurmRequestRefused` when the cluster cannot satisfy the request (too many GPUs per
        node, an unknown GPU type, partition, reservation or feature), `SlurmError` when
        Slurm could not be asked."""
        try:
            self.run(["sbatch", "--test-only"], stdin=script.text)
        except SlurmError as error:
            raise _refusal_or(error) from None

    def job_view(self, slurm_job_id: str) -> SlurmJobView | None:
        """Slurm's view of the job, or None once Slurm forgot it (MinJobAge after its end).

        Two `squeue` calls (squeue's short format has no restart count, its long format no
        excluded nodes); expanding node lists is local to scontrol.
        """
        base = ["squeue", "--noheader", "--states=all", f"--jobs={slurm_job_id}"]
        try:
            line = self.run([*base, f"--format={JOB_VIEW_FORMAT}"])
            restarts = self.run([*base, "--Format=RestartCnt:0"]).strip()
        except SlurmError as error:
            if "Invalid job id" in error.stderr:
                return None
            raise
        if not line.strip():
            return None
        return parse_job_line(
            slurm_job_id, line.splitlines()[0], int(restarts or 0), self.hostnames
        )

    def requeue(self, slurm_job_id: str, hold: bool = False) -> None:
        """Requeue the job (`scontrol requeue`; `requeuehold` keeps it held until released).

        Slurm ends the running batch script (SIGTERM, SIGKILL after KillWait): when the job
        requeues itself, the caller must expect that signal.
        """
        self.run(["scontrol", "requeuehold" if hold else "requeue", slurm_job_id])

    def release(self, slurm_job_id: str) -> None:
        """Let a held job run again (`scontrol release`)."""
        self.run(["scontrol", "release", slurm_job_id])

    def update_exclude(self, slurm_job_id: str, nodes: Sequence[str]) -> None:
        """Set the job's excluded nodes to exactly `nodes` (replaces the list, not appends).

        Slurm only accepts this while the job is pending ("Job is no longer pending
        execution" otherwise); `requeue_excluding` does it for a running job.
        """
        self.run(["scontrol", "update", f"JobId={slurm_job_id}", f"ExcNodeList={','.join(nodes)}"])

    def requeue_excluding(self, slurm_job_id: str, nodes: Sequence[str]) -> None:
        """Requeue a job so that its next run avoids `nodes` (the job's whole exclusion list).

        `requeuehold`, then `update_exclude` while it is held, then `release`: the job never
        becomes eligible with the old list. A job may do this to itself: Slurm then sends
        SIGTERM to every process of the batch step as soon as the job is held, which would
        kill the two commands that follow (measured). They therefore run with SIGTERM blocked
        in this thread, a mask the commands inherit; the caller receives its SIGTERM when
        this returns, and should then exit (SIGKILL follows after the cluster's KillWait).
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            self.requeue(slurm_job_id, hold=True)
            try:
                self.update_exclude(slurm_job_id, nodes)
            finally:
                self.release(slurm_job_id)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def cancel(self, slurm_job_id: str) -> None:
        """End the job for good (`scancel`): SIGTERM, then SIGKILL after KillWait."""
        self.run(["scancel", slurm_job_id])

    def send_signal(
        self,
        slurm_job_id: str,
        signal_name: str,
        target: Literal["batch", "full", "steps"] = "batch",
    ) -> None:
        """Send a signal without ending the job: `target` "batch" (the batch script only),
        "full" (batch script and every step) or "steps" (the steps only)."""
        flags = {"batch": ["--batch"], "full": ["--full"], "steps": []}[target]
        self.run(["scancel", f"--signal={signal_name}", *flags, slurm_job_id])

    # -- nodes --------------------------------------------------------------------------------

    def hostnames(self, nodelist: str) -> list[str]:
        """Expand a Slurm node list (`n[1-3],gpu07`) into names (`scontrol show hostnames`)."""
        if not nodelist:
            return []
        return self.run(["scontrol", "show", "hostnames", nodelist]).split()

    def node_address(self, name: str) -> str:
        """The address the node is reached at (its `NodeAddr`; often its hostname)."""
        match = NODE_ADDR.search(self.run(["scontrol", "--oneliner", "show", "node", name]))
        if match is None:
            raise SlurmError(["scontrol", "show", "node", name], "reported no NodeAddr")
        return match.group(1)

    def node_state(self, name: str) -> str:
        """The node's state as scontrol prints it (`IDLE`, `MIXED+DRAIN`, `DOWN*`, ...)."""
        match = NODE_STATE.search(self.run(["scontrol", "--oneliner", "show", "node", name]))
        if match is None:
            raise SlurmError(["scontrol", "show", "node", name], "reported no State")
        return match.group(1)

    def drain(self, node: str, reason: str) -> None:
        """Drain the node: running jobs finish, no new job lands on it. Needs operator rights."""
        self.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}"])

    def resume_node(self, node: str) -> None:
        """Return a drained node to service (`State=RESUME`)."""
        self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
