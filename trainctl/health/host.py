"""Host probes: free disk, free memory, rendezvous reachability, all-reduce bandwidth.

Each probe returns a reading from `readings.py` and never raises for the condition it probes
(a missing path, a refused connection): the failure is recorded in the reading and judged by
`verdict.py`. Only a bug raises.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterable
from typing import Any

from trainctl.health.readings import (
    BandwidthReading,
    DiskReading,
    EndpointReading,
    HostReading,
    MemoryReading,
    ProbeError,
)


def local_path(url: str) -> str | None:
    """The local filesystem path of a storage URL (plain path or ``file://``), else None.

    Object-store URLs (``s3://``) have no free space to measure: callers skip them.
    """
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url:
        return None
    return os.path.expanduser(url)


def _nearest_existing(path: str) -> str:
    """`path` or its nearest existing ancestor: a checkpoint directory may not exist yet."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def probe_disk(path: str) -> DiskReading:
    """Free and total bytes of the filesystem holding `path` (or its nearest existing ancestor)."""
    probed = _nearest_existing(path)
    try:
        usage = shutil.disk_usage(probed)
    except OSError as error:
        failure = ProbeError("disk_usage", error.errno, f"{probed}: {error.strerror or error}")
        return DiskReading(path=path, probed_path=probed, error=failure)
    return DiskReading(
        path=path, probed_path=probed, free_bytes=usage.free, total_bytes=usage.total
    )


def probe_memory(meminfo: str = "/proc/meminfo") -> MemoryReading:
    """MemAvailable and MemTotal from `meminfo` (Linux); elsewhere, sysconf page counts."""
    try:
        with open(meminfo, encoding="ascii") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        return MemoryReading(
            available_bytes=int(fields["MemAvailable"].split()[0]) * 1024,
            total_bytes=int(fields["MemTotal"].split()[0]) * 1024,
        )
    except FileNotFoundError:
        pass  # not Linux: fall through to sysconf
    except (OSError, KeyError, ValueError) as error:
        return MemoryReading(error=ProbeError("meminfo", None, f"{meminfo}: {error!r}"))
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return MemoryReading(
            available_bytes=os.sysconf("SC_AVPHYS_PAGES") * page,
            total_bytes=os.sysconf("SC_PHYS_PAGES") * page,
        )
    except (OSError, ValueError) as error:
        return MemoryReading(error=ProbeError("sysconf", None, repr(error)))


def probe_endpoint(host: str, port: int, *, timeout_s: float = 2.0) -> EndpointReading:
    """Open (and close) a TCP connection to `host:port`, waiting at most `timeout_s`.

    Blocks up to `timeout_s` (plus name resolution). A refused, unreachable or timed-out
    connection is a reading with `connected=False` and the OS's message, not an exception.
    """
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            elapsed = time.monotonic() - started
    except TimeoutError:
        failure = ProbeError("connect", None, f"timed out after {timeout_s:g} s")
        return EndpointReading(host, port, timeout_s, connected=False, error=failure)
    except OSError as error:
        failure = ProbeError("connect", error.errno, error.strerror or repr(error))
        return EndpointReading(host, port, timeout_s, connected=False, error=failure)
    return EndpointReading(host, port, timeout_s, connected=True, connect_s=elapsed)


def probe_host(
    paths: Iterable[str] = (),
    *,
    endpoint: tuple[str, int] | None = None,
    connect_timeout_s: float = 2.0,
) -> HostReading:
    """Every host probe: disk at each path, memory, and the endpoint when one is given."""
    return HostReading(
        hostname=socket.gethostname(),
        disks=tuple(probe_disk(path) for path in paths),
        memory=probe_memory(),
        endpoint=None
        if endpoint is None
        else probe_endpoint(endpoint[0], endpoint[1], timeout_s=connect_timeout_s),
    )


def allreduce_bandwidth(
    size_bytes: int = 16 << 20,
    *,
    iterations: int = 5,
    warmup: int = 1,
    group: Any = None,
    node: str | None = None,
    device: Any = None,
) -> list[BandwidthReading]:
    """Time an all-reduce of `size_bytes` on an existing process group; every rank's numbers.

    Collective: every rank of `group` (default: the world) must call it with the same
    arguments. Returns one reading per rank (gathered to every rank), in rank order; each
    rank reports its own `node` name. Interpretation is `verdict.bandwidth_verdicts`.
    Blocks for warmup + iterations all-reduces plus one all-gather.
    """
    import torch
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    num_elements = max(1, size_bytes // 4)
    tensor = torch.ones(num_elements, dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(tensor, group=group)
    dist.barrier(group=group)

    def synchronize() -> None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor, group=group)
    synchronize()
    per_iteration = (time.perf_counter() - started) / iterations

    actual_bytes = num_elements * 4
    algorithm = actual_bytes / per_iteration / 1e9
    mine = BandwidthReading(
        rank=rank,
        world_size=world_size,
        size_bytes=actual_bytes,
        iterations=iterations,
        seconds_per_iteration=per_iteration,
        algorithm_gb_per_s=algorithm,
        bus_gb_per_s=algorithm * 2 * (world_size - 1) / world_size,
        node=node,
    )
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine.to_dict(), group=group)
    return [BandwidthReading(**reading) for reading in gathered]
