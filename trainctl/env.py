"""The TRAINCTL_* environment names, defined once (re-exported by `trainctl.protocol`).

A module of its own, importing nothing heavy: the worker shim, which starts every worker,
imports only this and `trainctl.secrets` (each millisecond here is on every relaunch).
"""

from __future__ import annotations

import signal


class Env:
    """The environment variables trainctl sets for its own processes (and reads back)."""

    # -- every process of a job carries these tags (how a node's processes are found) --
    JOB_ID = "TRAINCTL_JOB_ID"
    NODE = "TRAINCTL_NODE"
    STORAGE = "TRAINCTL_STORAGE"
    """The storage root; also the user's default (`--storage` overrides it)."""
    STORAGE_TIMEOUT_S = "TRAINCTL_STORAGE_TIMEOUT_S"
    """How long, in seconds, one storage request may take (connect, then each read) and a
    command's first request may take, retries included; the user's setting (default 10)."""
    # -- node agent --
    CONTROL_TOKEN = "TRAINCTL_CONTROL_TOKEN"
    """The job's control token, for the agent's connection to the controller."""
    LIVENESS = "TRAINCTL_LIVENESS"
    """How the agent judges its controller's heartbeats (`LivenessPolicy` fields as JSON)."""
    AGENT_LOG = "TRAINCTL_AGENT_LOG"
    PROGRESS_INTERVAL = "TRAINCTL_PROGRESS_INTERVAL_S"
    """How often, in seconds, the agent forwards its workers' progress (`progress_interval`)."""
    WARM_WORKERS = "TRAINCTL_WARM_WORKERS"
    RDZV_POLL_S = "TRAINCTL_RDZV_POLL_S"
    """The warm torchrun's rendezvous poll interval (`trainctl.launch.warmrun`)."""
    # -- torchrun and its workers (set per attempt by the plan and the agent) --
    ATTEMPT = "TRAINCTL_ATTEMPT"
    SEED = "TRAINCTL_SEED"
    MAX_STEPS = "TRAINCTL_MAX_STEPS"
    CONFIG = "TRAINCTL_CONFIG"
    """The recipe's free-form ``config:`` as JSON."""
    STOP_GRACE_S = "TRAINCTL_STOP_GRACE_S"
    CHECKPOINT = "TRAINCTL_CHECKPOINT"
    """The validated ``checkpoint:`` section as JSON, credentials left out."""
    HEALTH = "TRAINCTL_HEALTH"
    """The validated ``health:`` section as JSON (the collective timeout derives from it)."""
    CHECKPOINT_ROOT = "TRAINCTL_CHECKPOINT_ROOT"
    SECRETS_FILE = "TRAINCTL_SECRETS_FILE"
    """A 0600 file with the recipe's secret values (`trainctl.secrets`), never the values."""
    FAULTS_DIR = "TRAINCTL_FAULTS_DIR"
    """Testing: where a planned storage-outage fault is signalled (absent: none planned)."""
    AGENT_SOCKET = "TRAINCTL_AGENT_SOCKET"
    WORKER_TOKEN = "TRAINCTL_WORKER_TOKEN"
    PEER_TOKEN_FILE = "TRAINCTL_PEER_TOKEN_FILE"
    """A 0600 file (in the node's memory-tier directory) with what a worker reads peers'
    memory-tier copies with (`peer_wire.read_token`: ``get`` only, derived from the job's
    token). A file, not the value: environments leak (``ps e``, crash reports, children)."""
    STACKS_DIR = "TRAINCTL_STACKS_DIR"
    WORKER_SERVER_DIR = "TRAINCTL_WORKER_SERVER_DIR"
    """A private directory where each worker serves torch's debug handlers on
    ``r<RANK>.sock`` (the flight recorder, read on demand by the agent)."""
    ZYGOTE = "TRAINCTL_ZYGOTE"
    STEP_LOG = "TRAINCTL_STEP_LOG"
    """Benchmarks: rank 0 appends "time pid step world_size" per step to this file."""


STACK_DUMP_SIGNAL = signal.SIGUSR2
"""Agent -> worker: write your Python stacks into ``<TRAINCTL_STACKS_DIR>/rank-<RANK>.txt``
(faulthandler; the fallback when py-spy cannot read the process)."""


def unix_address(address: str) -> str:
    """The kernel's form of a socket name: ``@name`` is the abstract namespace (no file)."""
    return "\0" + address[1:] if address.startswith("@") else address
