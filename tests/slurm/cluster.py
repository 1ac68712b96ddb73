"""A real Slurm cluster on localhost: one munged, one slurmctld, N slurmd (n1..nN).

Follows ../shared/reference/slurm-local-cluster.md: Debian's own Slurm 22.05 packages, run as
root with no systemd, cgroups or database; every file (config, state, logs, munge key and
socket) lives under one directory; ports are picked free at bring-up (never fixed), so two
clusters on one host do not collide. The daemons run in the foreground as our own children
(`-D`, `-F`), so teardown knows every pid without pid files.

Two settings make the tests fast: `AuthInfo=cred_expire=5` (a requeued job otherwise waits
121 s before it may start again) and `SchedulerParameters=bf_interval=1` (a job behind a
blocked one otherwise waits up to 30 s for the backfill pass).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REQUIRED_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"

SLURM_CONF_TEMPLATE = """\
ClusterName=trainctl-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={first_node_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout={slurmd_timeout_s}
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
GresTypes=gpu
{node_lines}
PartitionName=debug Nodes={node_range} Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """The Slurm and munge programs this host lacks."""
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free right now (bound together on port 0)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _environ(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return False
    return raw[raw.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class LocalSlurmCluster:
    """One Slurm cluster under `root`. `up()` starts it, `down()` stops every process of it."""

    def __init__(
        self,
        root: Path,
        num_nodes: int = 4,
        cpus_per_node: int = 2,
        cred_expire_s: int = 5,
        slurmd_timeout_s: int = 10,
        gpus_per_node: int = 2,
        gpu_type: str = "h100",
    ) -> None:
        self.root = root
        self.gpus_per_node = gpus_per_node
        self.gpu_type = gpu_type
        self.nodes = [f"n{i}" for i in range(1, num_nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.cred_expire_s = cred_expire_s
        self.slurmd_timeout_s = slurmd_timeout_s
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "run" / "munge.sock"
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment every Slurm command (and job) of this cluster runs with."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- bring-up -----------------------------------------------------------------------------

    def up(self, timeout_s: float = 60.0) -> None:
        """Write the config, start munged, slurmctld and one slurmd per node; wait for idle."""
        for sub in ("etc", "state/ctld", "state/d", "log", "run", "munge/key", "munge/run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose parent directories are not o+x.
        for directory in (self.root, self.root / "munge", self.munge_socket.parent):
            directory.chmod(0o755)
        (self.root / "munge" / "key").chmod(0o700)
        ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ports[0], ports[1:]))
        self._make_gpus()
        self._start_munged()
        self._spawn("slurmctld", ["slurmctld", "-D"])
        for node in self.nodes:
            (self.root / "state" / "d" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait_idle(timeout_s)

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 "
            f"Gres=gpu:{self.gpu_type}:{self.gpus_per_node} State=UNKNOWN"
            for node, port in zip(self.nodes, node_ports, strict=True)
        )
        return SLURM_CONF_TEMPLATE.format(
            root=self.root,
            ctld_port=ctld_port,
            first_node_port=node_ports[0],
            munge_socket=self.munge_socket,
            cred_expire_s=self.cred_expire_s,
            slurmd_timeout_s=self.slurmd_timeout_s,
            node_lines=node_lines,
            node_range=f"n[1-{len(self.nodes)}]",
        )

    def _make_gpus(self) -> None:
        """Fake GPUs: `gres.conf` (beside slurm.conf, AutoDetect=off) gives every node
        `gpus_per_node` devices of type `gpu_type`, backed by character devices with NVIDIA's
        major number 195 under `<root>/dev`. They must be devices: with regular files slurmd
        22.05 logs "is not a valid character or block device, fix your gres.conf" and a step
        gets no CUDA_VISIBLE_DEVICES. All nodes share the files (one host); no driver is
        behind them, and nothing opens them."""
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for index in range(self.gpus_per_node):
            path = devices / f"nvidia{index}"
            if not path.exists():
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(195, index))
        (self.conf.parent / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName=n[1-{len(self.nodes)}] Name=gpu Type={self.gpu_type} "
            f"File={devices}/nvidia[0-{self.gpus_per_node - 1}]\n"
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.stdout", "ab") as out:
            self.daemons[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _start_munged(self) -> None:
        key = self.root / "munge" / "key" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munge' / 'run' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["munge", "-S", str(self.munge_socket), "-n"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not start:\n{self.log_tail('munged.log')}")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.daemons.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode}:\n"
                        + self.log_tail(f"{name}.stdout")
                        + self.log_tail("slurmctld.log")
                    )
            result = self.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False)
            idle = sum(int(n) for n in result.stdout.split() if n.isdigit())
            if idle == len(self.nodes):
                return
            time.sleep(0.1)
        state = self.run("sinfo", "-N", check=False)
        raise RuntimeError(f"nodes not idle after {timeout_s:g} s:\n{state.stdout}{state.stderr}")

    # -- using it -----------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster (20 s limit)."""
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=20, check=check
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / "log" / name
        if not path.exists():
            return f"({path} missing)\n"
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])

    def active_jobs(self) -> list[str]:
        """Ids of jobs still pending, running or completing."""
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def job_processes(self) -> list[int]:
        """Live processes started by a job of this cluster (steps, payloads, their children)."""
        marker = f"SLURM_CONF={self.conf}"
        found = []
        for pid in _pids():
            if pid == os.getpid():
                continue
            env = _environ(pid)
            if marker in env and any(v.startswith("SLURM_JOB_ID=") for v in env) and _alive(pid):
                found.append(pid)
        return found

    def leftover_processes(self) -> list[int]:
        """Every live process of this cluster: daemons, slurmstepds, job processes, srun."""
        marker = f"SLURM_CONF={self.conf}"
        log_dir = f"{self.root}/log/"
        found = []
        for pid in _pids():
            if pid == os.getpid() or not _alive(pid):
                continue
            if marker in _environ(pid) or self._holds_log(pid, log_dir):
                found.append(pid)
        return found

    def crash_node(self, node: str) -> list[int]:
        """Kill `node` as a dead host would die: its slurmd, its slurmstepds and every job
        process on it, all with SIGKILL (killing slurmd alone leaves its jobs running).
        Slurm notices ~25-30 s later (SlurmdTimeout plus its ping cycle). Returns the pids."""
        killed = []
        daemon = self.daemons.get(f"slurmd-{node}")
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
            killed.append(daemon.pid)
        marker, on_node = f"SLURM_CONF={self.conf}", f"SLURMD_NODENAME={node}"
        node_log = f"{self.root}/log/slurmd-{node}.log"
        for pid in _pids():
            env = _environ(pid)
            if (marker in env and on_node in env) or self._holds_log(pid, node_log):
                _kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed

    def restart_node(self, node: str) -> None:
        """Start `node`'s slurmd again (ReturnToService=2 puts the node back in service)."""
        self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])

    @staticmethod
    def _holds_log(pid: int, log_prefix: str) -> bool:
        # slurmstepd is started with a clean environment; it is found by its open log file.
        try:
            return any(
                os.readlink(f"/proc/{pid}/fd/{fd}").startswith(log_prefix)
                for fd in os.listdir(f"/proc/{pid}/fd")
            )
        except OSError:
            return False

    # -- teardown -----------------------------------------------------------------------------

    def down(self, grace_s: float = 10.0) -> list[int]:
        """Stop everything of this cluster; returns the pids still alive afterwards (none)."""
        slurm = [p for name, p in self.daemons.items() if name != "munged"]
        # All at once: stopping the daemons one by one takes ~4x longer.
        self._terminate(slurm, grace_s)
        for pid in self.leftover_processes():
            if pid not in {p.pid for p in self.daemons.values()}:
                _kill(pid, signal.SIGKILL)
        munged = self.daemons.get("munged")
        if munged is not None:
            self._terminate([munged], grace_s)
        deadline = time.monotonic() + grace_s
        left = self.leftover_processes()
        while left and time.monotonic() < deadline:
            for pid in left:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            left = self.leftover_processes()
        return left

    @staticmethod
    def _terminate(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def local_slurm_cluster(root: Path, **settings: int) -> Iterator[LocalSlurmCluster]:
    """A running cluster under `root` for the duration of the block, then nothing left."""
    cluster = LocalSlurmCluster(root, **settings)
    try:
        cluster.up()
        yield cluster
    finally:
        left = cluster.down()
        assert not left, f"processes of the Slurm cluster left behind: {left}"
