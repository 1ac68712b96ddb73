"""What runs inside workers: process-group init, rank context, heartbeats, stop flag, results.

A recipe script does::

    from trainctl import runtime

    ctx = runtime.init()                  # process group with a per-attempt store prefix
    for step in range(start, ctx.max_steps or 100):
        ...train one step...
        ctx.progress(step + 1)            # heartbeat: the step that just completed
        if ctx.should_stop():             # SIGTERM/SIGUSR1 on any rank (agreed by all ranks)
            break
    ctx.finish(model, step + 1)           # fingerprint of the full weights -> job store

Settings are read once, from the environment the node agent sets (`WorkerSettings`), and
passed down as a typed `RankContext`. Without torchrun (no ``RANK``) the context is a single
process with no process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from datetime import timedelta
from typing import IO, Any, NoReturn

import torch

from trainctl.runtime import device as devices
from trainctl.runtime.collective_timeout import CollectiveTimeout
from trainctl.runtime.fingerprint import model_fingerprint
from trainctl.runtime.reporter import Reporter
from trainctl.runtime.settings import WorkerSettings

__all__ = ["RankContext", "init"]


@dataclasses.dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    node: str
    job_id: str
    attempt: int
    restart_count: int
    seed: int
    max_steps: int | None
    config: dict[str, Any]
    device: torch.device
    reporter: Reporter
    distributed: bool
    settings: WorkerSettings = dataclasses.field(default_factory=WorkerSettings)
    """Everything the node agent told this worker (the checkpoint section among it)."""
    collective_timeout: CollectiveTimeout | None = None
    """Derives the process group's timeout from this rank's step times (`collective_timeout`)."""
    _debug_server: Any = None
    """torch's worker server: the agent reads the flight recorder through it, on demand."""
    _stop_signal: list[str] = dataclasses.field(default_factory=list)
    _step_log: IO[str] | None = None
    """``TRAINCTL_STEP_LOG``: rank 0 appends "time pid step world_size" per step (benchmarks
    time recoveries from it, for trainctl and plain torchrun alike)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """A line in the node log, prefixed with the rank (rank 0 only unless all=True)."""
        print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)

    def progress(self, step: int) -> None:
        """Report that `step` steps have completed (feeds hang and straggler detection, and
        the process group's collective timeout)."""
        step_time = self.reporter.progress(step)
        if self.collective_timeout is not None:
            applied = self.collective_timeout.observe(step_time)
            if applied is not None and self.is_main:
                self.log(f"collective timeout now {applied:.0f} s (derived from step times)")
        if self._step_log is not None:
            self._step_log.write(f"{time.time():.6f} {os.getpid()} {step} {self.world_size}\n")

    def to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`batch` on this rank's device (a no-op on the CPU; pinned, asynchronous copies to
        a GPU)."""
        return devices.to_device(batch, self.device)

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Mark work that waits for no other rank; its time is the step's busy time.

        ``with ctx.busy(): batch = load(step)`` — straggler detection compares ranks' busy
        times (wall-clock step times are equal across ranks in synchronous training). Optional:
        without it, the wall-clock step time is reported alone.
        """
        return self.reporter.busy()

    @property
    def stop_requested_locally(self) -> bool:
        return bool(self._stop_signal)

    def should_stop(self) -> bool:
        """True once any rank received SIGTERM/SIGUSR1. A collective: call it on every rank."""
        flag = torch.tensor([1 if self._stop_signal else 0], dtype=torch.int32)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def event(self, kind: str, message: str, /, **data: Any) -> None:
        """Record an event in the job store (through the node agent)."""
        self.reporter.event(kind, message, **data)

    def finish(self, model: torch.nn.Module, final_step: int) -> str | None:
        """Fingerprint the full weights (collective) and report them with the final step."""
        digest = model_fingerprint(model)
        if digest is not None:
            self.reporter.result(final_step, digest)
            self.log(f"finished at step {final_step}, fingerprint {digest}")
        return digest

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                # Rank 0 hosts this round's bootstrap store: let every rank get here before
                # anyone tears the group down, so no rank is still talking to a closing store.
                dist.barrier()
                dist.destroy_process_group()
        if self._debug_server is not None:
            self._debug_server.shutdown()
            self._debug_server = None
        self.reporter.close()

    def exit(self, code: int = 0) -> NoReturn:
        """Close, flush and end the worker without running C++ static destructors.

        Once every collective is done and the results are reported, nothing is lost by skipping
        interpreter and C++ teardown — and that teardown races: on this project's machine about
        1 exit in 12 of a finished gloo worker aborted with "terminate called without an active
        exception" (a joinable c10d/gloo thread destroyed at exit), which torchrun reports as a
        failed worker (exit code -6) after training had succeeded.
        """
        self.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _init_process_group(
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    settings: WorkerSettings,
    device: torch.device,
) -> None:
    """Join the process group through a store that holds nothing from an earlier round.

    trainctl's agents run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so each
    rendezvous round bootstraps on a fresh store hosted by that round's rank 0. Under a shared
    store that outlives rounds (stock torchrun), a restarted worker can read a dead worker's
    gloo address (stock restarts succeeded 5 of 10 times on this project's machine), so there
    the keys are also namespaced by restart count — the fix measured 8 of 8 with one agent;
    with several agents the counts can disagree, which is why trainctl avoids that mode.
    """
    import torch.distributed as dist

    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(seconds=timeout_s)
    base = dist.TCPStore(
        host,
        port,
        world_size=None if agent_store else world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefix = f"trainctl/{settings.job_id}/a{settings.attempt}/"
    if agent_store:
        prefix += f"r{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store = dist.PrefixStore(prefix, base)
    # On a GPU, `device_id` binds the group to this rank's GPU (NCCL's communicator is built
    # for it, eagerly, instead of guessing a device at the first collective).
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def _set_collective_timeout(seconds: float) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


def _serve_debug_handlers(directory: str | None, rank: int) -> Any:
    """torch's worker server on ``<directory>/r<RANK>.sock``: its handlers (the flight
    recorder among them) answer from C++ threads, so the agent can read them while this
    rank's Python is stuck. None where torch lacks it or the socket cannot be made."""
    if not directory:
        return None
    try:
        from torch._C._distributed_c10d import _WorkerServer

        return _WorkerServer(f"{directory}/r{rank}.sock")
    except Exception as error:  # the evidence is a bonus: never fail a worker for it
        print(f"trainctl: no debug handlers for the agent: {error!r}", file=sys.stderr)
        return None


def init(backend: str | None = None, timeout_s: float | None = None) -> RankContext:
    """Initialise this worker: its device, process group, signal handlers, reporter. Once.

    On a host with CUDA the worker binds ``cuda:LOCAL_RANK`` before it joins the group
    (`trainctl.runtime.device`); the group starts with ``health.first_step_allowance_s`` as
    its collective timeout (`timeout_s` overrides it) and then follows the step times
    (`trainctl.runtime.collective_timeout`).
    """
    settings = WorkerSettings.from_environ(os.environ)
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    distributed = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    cuda = torch.cuda.is_available()
    device = devices.choose_device(
        local_rank,
        cuda_available=cuda,
        device_count=torch.cuda.device_count() if cuda else 0,
        environ=os.environ,
    )
    devices.bind(device)
    collective_timeout = None
    if distributed:
        initial_s = timeout_s or CollectiveTimeout.initial_s(settings.health)
        _init_process_group(
            rank,
            world_size,
            backend or devices.default_backend(device),
            initial_s,
            settings,
            device,
        )
        if timeout_s is None:
            collective_timeout = CollectiveTimeout(
                settings.health,
                checkpointing=bool(settings.checkpoint and settings.checkpoint.interval_steps),
                apply=_set_collective_timeout,
                current_s=initial_s,
            )
    ctx = RankContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        node=settings.node,
        job_id=settings.job_id,
        attempt=settings.attempt,
        restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
        seed=settings.seed,
        max_steps=settings.max_steps,
        config=settings.config,
        device=device,
        reporter=Reporter.from_settings(settings, rank),
        distributed=distributed,
        settings=settings,
        collective_timeout=collective_timeout,
        _debug_server=_serve_debug_handlers(settings.worker_server_dir, rank)
        if distributed
        else None,
    )
    if settings.step_log and rank == 0:
        ctx._step_log = open(settings.step_log, "a", buffering=1)  # noqa: SIM115 - for the run

    def on_stop(signum: int, _frame: object) -> None:
        ctx._stop_signal.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, on_stop)
    _record_uncaught_exceptions()
    return ctx


def _record_uncaught_exceptions() -> None:
    """Write torchrun's error file for an uncaught exception (what `@record` does).

    The node agent reads these files to tell a software error (the same exception everywhere)
    from a node fault (a worker killed by a signal writes none).
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    handler = ErrorHandler()
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, Exception):
            try:
                handler.record_exception(value)
            except Exception as exc:  # the original error matters more than this one
                print(f"trainctl: could not write the error file: {exc}", file=sys.stderr)
        previous(kind, value, tb)

    sys.excepthook = hook
