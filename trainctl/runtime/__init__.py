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
        """Report that `step` steps have completed (feeds hang and straggler detection)."""
        self.reporter.progress(step)
        if self._step_log is not None:
            self._step_log.write(f"{time.time():.6f} {os.getpid()} {step} {self.world_size}\n")

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


def _default_backend() -> str:
    # async DCP saves need a CPU backend, so GPU jobs get both gloo and nccl.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(
    rank: int, world_size: int, backend: str, timeout_s: float, settings: WorkerSettings
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
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def init(backend: str | None = None, timeout_s: float = 120.0) -> RankContext:
    """Initialise this worker: process group, signal handlers, reporter. Call once."""
    settings = WorkerSettings.from_environ(os.environ)
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    distributed = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if distributed:
        _init_process_group(rank, world_size, backend or _default_backend(), timeout_s, settings)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
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
