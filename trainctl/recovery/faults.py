"""Fault injection for tests and demos (`trainctl launch --fault`, local scheduler only).

Wrapped in at the edges, and only when a fault is planned: the controller holds a `Faults`
object — `NoFaults` (does nothing) unless the job has faults, then a `FaultInjector` — and
tells it each step the job reaches; a planned storage outage adds the faults directory to the
agents' environment, where the worker runtime finds it and wraps its checkpoint storage
(`trainctl.checkpoint.outage.InjectedOutage`).

Each fault fires once, when the job first reports its step: ``kill-node`` kills every process
of the node with SIGKILL (as a dead host would), ``freeze-node`` SIGSTOPs every process of the
node (a host that died without closing a connection: a kernel panic, a power loss — its sockets
stay open, no FIN ever comes), ``kill-worker`` SIGKILLs one worker, ``hang`` SIGSTOPs one
worker, ``partition-node`` drops the node agent's control traffic with nftables (its processes
keep running; from then on the controller cannot kill them either, as with a host it cannot
reach — the node must tear itself down), ``nvml-xid`` adds an XID 79 (GPU fallen off the bus)
to the node's fake NVML file (tests/fakenvml; the node needs
``node_env.<node>.FAKE_NVML_FILE``), ``storage-outage`` makes every checkpoint storage
request fail for ``for`` seconds, and ``corrupt-memory`` flips bytes in every recorded slot of the
node's own memory tier (`trainctl.checkpoint.memory`), as a bad DIMM would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from trainctl.checkpoint.outage import OUTAGE_FILE
from trainctl.errors import UserError
from trainctl.events import FaultInjected
from trainctl.launch.local import LocalScheduler
from trainctl.launch.scheduler import NodeScheduler
from trainctl.protocol import Env
from trainctl.recovery.journal import Journal
from trainctl.spec import FaultSpec, JobSpec


def check_faults(spec: JobSpec, scheduler: str) -> None:
    """Refuse faults this job cannot inject, before anything starts."""
    if spec.faults and scheduler != "local":
        raise UserError(
            "fault injection works with the local scheduler only",
            where="--fault",
            value=spec.faults[0].describe(),
            fix="drop --fault, or run with the local scheduler",
        )
    for fault in spec.faults:
        if fault.kind == "nvml-xid":
            node = fault.node or ""
            if "FAKE_NVML_FILE" not in spec.node_env.get(node, {}):
                raise UserError(
                    "an nvml-xid fault needs the fake NVML on that node",
                    where="--fault",
                    value=fault.describe(),
                    fix=f"set node_env.{node}.FAKE_NVML_FILE in the recipe (see tests/fakenvml)",
                )


class NoFaults:
    """What a job without planned faults holds: every hook does nothing."""

    failed_at: float | None = None
    """When the last injected fault fired (the best evidence of when its failure began)."""

    def reachable(self, scheduler: NodeScheduler) -> NodeScheduler:
        """The scheduler as the controller sees it (a partitioned node cannot be reached)."""
        return scheduler

    def agent_env(self) -> dict[str, str]:
        return {}

    def reached(self, step: int) -> None:
        pass

    def tick(self) -> None:
        pass

    def attempt_started(self) -> None:
        self.failed_at = None

    def close(self) -> None:
        pass


class Unreachable:
    """The local scheduler as seen across a partition: nodes in `cut` cannot be killed (their
    processes must end themselves, as on a host nothing can reach)."""

    def __init__(self, inner: LocalScheduler, cut: set[str]) -> None:
        self.inner = inner
        self.cut = cut
        self.name = inner.name

    def start_agent(
        self, node: str, env: dict[str, str], log_path: str, control_endpoint: str
    ) -> int:
        return self.inner.start_agent(node, env, log_path, control_endpoint)

    def agent_running(self, node: str) -> bool:
        return self.inner.agent_running(node)

    def agent_exit_code(self, node: str) -> int | None:
        return None if node in self.cut else self.inner.agent_exit_code(node)

    def kill_node(self, job_id: str, node: str, grace_s: float = 0.0) -> None:
        if node not in self.cut:
            self.inner.kill_node(job_id, node, grace_s)

    def stop_all(self, job_id: str, grace_s: float) -> list[int]:
        return self.inner.stop_all(job_id, grace_s)

    def wait_agents(self, timeout_s: float) -> bool:
        return self.inner.wait_agents(timeout_s)


def nft(*args: str) -> None:
    """Run one nftables command; a failure is the fault's (missing nft, no CAP_NET_ADMIN)."""
    result = subprocess.run(["nft", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)}: {result.stderr.strip()}")


class FaultInjector(NoFaults):
    def __init__(
        self,
        spec: JobSpec,
        scheduler: LocalScheduler,
        journal: Journal,
        faults_dir: Path,
        say: Callable[[str], None],
        peer_of: Callable[[str], str | None] = lambda node: None,
    ) -> None:
        self.spec = spec
        self.scheduler = scheduler
        self.journal = journal
        self.faults_dir = faults_dir
        self.say = say
        self.peer_of = peer_of
        self.cut: set[str] = set()
        self._table: str | None = None
        fired = journal.record.faults_fired
        self.pending = [f for f in spec.faults if f.describe() not in fired]
        self._outage_until: float | None = None

    def agent_env(self) -> dict[str, str]:
        if any(f.kind == "storage-outage" for f in self.spec.faults):
            return {Env.FAULTS_DIR: str(self.faults_dir)}
        return {}

    def reached(self, step: int) -> None:
        """Fire every pending fault whose step the job reached, recording each."""
        due = [f for f in self.pending if step >= f.step]
        self.pending = [f for f in self.pending if f not in due]
        for fault in due:
            self.failed_at = time.time()
            done = self.fire(fault)
            self.journal.record.faults_fired.append(fault.describe())
            self.journal.event(
                FaultInjected(fault=fault.kind, spec=fault.describe(), step=step),
                f"injected {fault.describe()}: {done}",
                node=fault.node,
            )
            self.say(f"fault injected: {fault.describe()}")
            self.journal.save_state()

    def fire(self, fault: FaultSpec) -> str:
        """Inject `fault`; returns what was done, for the event."""
        job_id, node = self.journal.job_id, fault.node or ""
        if fault.kind == "kill-node":
            pids = self.scheduler.node_processes(job_id, node)
            self.scheduler.kill_node(job_id, node)
            return f"SIGKILL to every process of {node} ({len(pids)})"
        if fault.kind == "freeze-node":
            pids = self.scheduler.node_processes(job_id, node)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            return f"SIGSTOP to every process of {node} ({len(pids)})"
        if fault.kind in ("kill-worker", "hang"):
            workers = self.scheduler.worker_pids(job_id, node, local_rank=0)
            if not workers:
                return f"no worker found on {node}"
            sig = signal.SIGKILL if fault.kind == "kill-worker" else signal.SIGSTOP
            os.kill(workers[0], sig)
            return f"{sig.name} to worker pid {workers[0]} (local rank 0) on {node}"
        if fault.kind == "partition-node":
            return self._partition(node)
        if fault.kind == "partition-node":
            return self._partition(node)
        if fault.kind == "corrupt-memory":
            return _corrupt_memory(job_id, node)
        if fault.kind == "nvml-xid":
            path = Path(self.spec.node_env[node]["FAKE_NVML_FILE"])
            with path.open("a") as handle:
                handle.write("\ngpu.0.xid=79\n")
            return f"XID 79 on GPU 0 of {node} (fake NVML {path})"
        if fault.kind == "storage-outage":
            self.faults_dir.mkdir(parents=True, exist_ok=True)
            until = time.time() + fault.duration_s
            (self.faults_dir / OUTAGE_FILE).write_text(f"{until}\n")
            self._outage_until = until
            return f"checkpoint storage refuses every request for {fault.duration_s:g} s"
        raise ValueError(f"unknown fault {fault.kind}")

    def reachable(self, scheduler: NodeScheduler) -> NodeScheduler:
        return Unreachable(self.scheduler, self.cut)

    def _partition(self, node: str) -> str:
        peer = self.peer_of(node)
        if peer is None:
            return f"{node} has no control connection to cut"
        port = int(peer.rsplit(":", 1)[1])
        if self._table is None:
            self._table = f"trainctl_faults_{os.getpid()}"
            nft("add", "table", "inet", self._table)
            nft(
                "add chain inet",
                self._table,
                "input { type filter hook input priority 0 ; }",
            )
        for direction in ("sport", "dport"):
            nft("add rule inet", self._table, f"input tcp {direction} {port} drop")
        self.cut.add(node)
        return (
            f"every packet of {node}'s control connection (port {port}) dropped; its "
            "processes keep running and can no longer be killed from here"
        )

    def tick(self) -> None:
        """Lift an expired outage."""
        if self._outage_until is not None and time.time() >= self._outage_until:
            (self.faults_dir / OUTAGE_FILE).unlink(missing_ok=True)
            self._outage_until = None

    def close(self) -> None:
        (self.faults_dir / OUTAGE_FILE).unlink(missing_ok=True)
        if self._table is not None:
            with contextlib.suppress(RuntimeError, OSError):
                nft("delete", "table", "inet", self._table)


def plan_faults(
    spec: JobSpec,
    scheduler: NodeScheduler,
    journal: Journal,
    faults_dir: Path,
    say: Callable[[str], None],
    peer_of: Callable[[str], str | None] = lambda node: None,
) -> NoFaults:
    """The job's fault hooks: an injector when faults are planned (local scheduler only)."""
    if spec.faults and isinstance(scheduler, LocalScheduler):
        return FaultInjector(spec, scheduler, journal, faults_dir, say, peer_of)
    return NoFaults()


def _corrupt_memory(job_id: str, node: str) -> str:
    """Flip up to 64 bytes of the first entry of every recorded slot of `node`'s own memory
    tier (its ranks' slots, `trainctl.checkpoint.slot_layout`), as a bad DIMM would after the
    holder summed them: a slot the holder has not summed yet is summed first, so the flip is
    always detectable and a restore skips those copies."""
    from trainctl.checkpoint.layout import node_memory_root
    from trainctl.checkpoint.slot_catalog import (
        checksums_json,
        parse_slots,
        read_json_tree,
        slot_crcs,
        spans,
    )
    from trainctl.checkpoint.slot_layout import (
        SLOTS_DIR,
        checksums_name,
        slot_name,
        write_json_atomic,
    )

    folder = Path(node_memory_root(job_id, node), SLOTS_DIR)
    count = 0
    for rank, slots in sorted(parse_slots(read_json_tree(str(folder))).items()):
        entries = spans(slots.layout)
        start = next(((o, n) for o, n in entries if n > 0), None)
        if start is None:
            continue
        for index, record in sorted(slots.records.items()):
            path = folder / slot_name(rank, index)
            with contextlib.suppress(OSError):
                if index not in slots.checksums:
                    sums = checksums_json(record, slot_crcs(str(path), entries))
                    write_json_atomic(str(folder / checksums_name(rank, index)), sums)
                with path.open("r+b") as handle:
                    handle.seek(start[0])
                    flipped = bytes(b ^ 0xFF for b in handle.read(min(64, start[1])))
                    handle.seek(start[0])
                    handle.write(flipped)
                count += 1
    return f"flipped bytes in {count} memory slot file(s) of {node}"
