"""Host probes against the real OS, and the gate end to end (fake NVML in a subprocess)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from trainctl.health.host import (
    local_path,
    probe_disk,
    probe_endpoint,
    probe_host,
    probe_memory,
)
from trainctl.health.verdict import HostPolicy, Verdict, host_verdict

EnvFactory = Callable[[Path | None, Path | None], dict[str, str]]


def test_disk_probe_measures_the_nearest_existing_ancestor(tmp_path: Path) -> None:
    wanted = tmp_path / "ckpt" / "job-1"  # not created yet, as before a job's first save
    reading = probe_disk(str(wanted))
    assert reading.path == str(wanted) and reading.probed_path == str(tmp_path)
    assert reading.error is None and reading.free_bytes is not None and reading.total_bytes
    assert 0 <= reading.free_bytes <= reading.total_bytes


def test_disk_below_minimum_is_unhealthy(tmp_path: Path) -> None:
    host = probe_host([str(tmp_path)])
    assert host_verdict(host, HostPolicy(min_free_disk_bytes=0)).status is Verdict.OK
    huge = HostPolicy(min_free_disk_bytes=1 << 60)  # an exabyte: no test machine has it
    verdict = host_verdict(host, huge)
    assert verdict.status is Verdict.UNHEALTHY
    assert verdict.reason.startswith(f"disk {tmp_path}: ") and "need 1073741824.0 GiB" in (
        verdict.reason
    )


def test_memory_probe_reads_meminfo_and_reports_a_broken_file(tmp_path: Path) -> None:
    memory = probe_memory()
    assert memory.error is None and 0 < (memory.available_bytes or 0) <= (memory.total_bytes or 0)
    broken = tmp_path / "meminfo"
    broken.write_text("MemTotal: lots\n")
    assert probe_memory(str(broken)).error is not None


def test_endpoint_reachable_and_unreachable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        reached = probe_endpoint("127.0.0.1", port, timeout_s=5.0)
    assert reached.connected and reached.error is None
    # The port was just released and nothing listens there now: refused.
    refused = probe_endpoint("127.0.0.1", port, timeout_s=5.0)
    assert not refused.connected and refused.error is not None
    verdict = host_verdict(probe_host(endpoint=("127.0.0.1", port), connect_timeout_s=5.0))
    assert verdict.status is Verdict.UNHEALTHY
    assert verdict.reason.startswith(f"rendezvous: cannot reach rendezvous 127.0.0.1:{port}")


def test_local_path_skips_object_stores() -> None:
    assert local_path("/data/ckpt") == "/data/ckpt"
    assert local_path("file:///data/ckpt") == "/data/ckpt"
    assert local_path("s3://bucket/ckpt") is None


GATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from trainctl.health.gate import GateConfig, preflight
    config = GateConfig(paths=(sys.argv[1], "s3://bucket/ckpt"), min_free_disk_bytes=0,
                        require_nvml=True)
    result = preflight(config)
    print(json.dumps(result.record("node1").to_dict()))
    """
)


def run_gate(env: dict[str, str], path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", GATE_SCRIPT, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    record: dict = json.loads(done.stdout)
    return record


def test_gate_passes_a_healthy_gpu_node(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    faults = tmp_path / "node1.nvml"
    faults.write_text("device_count=4\n")
    record = run_gate(sealed_env(fake_nvml_lib, faults), tmp_path)
    assert record["node"] == "node1" and record["phase"] == "preflight"
    assert record["status"] == "OK"
    assert record["evidence"]["gpus"]["reason"] == "4 GPUs OK (driver 550.54.15)"
    assert record["evidence"]["skipped_paths"] == ["s3://bucket/ckpt"]


def test_gate_blocks_a_node_with_xid_79_and_keeps_the_evidence(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    faults = tmp_path / "node1.nvml"
    faults.write_text("device_count=4\ngpu.2.xid=79\n")
    record = run_gate(sealed_env(fake_nvml_lib, faults), tmp_path)
    assert record["status"] == "UNHEALTHY"
    assert record["reason"] == "gpus: gpu2: XID 79 (GPU has fallen off the bus)"
    gpu2 = record["evidence"]["gpus"]["evidence"]["gpu2"]["evidence"]
    assert gpu2["reading"]["xid_events"] == [79]
    assert gpu2["reading"]["uuid"].startswith("GPU-")
    assert record["evidence"]["host"]["status"] == "OK"


def test_gate_requiring_nvml_fails_when_the_driver_is_not_loaded(
    fake_nvml_lib: Path, sealed_env: EnvFactory, tmp_path: Path
) -> None:
    faults = tmp_path / "node1.nvml"
    faults.write_text("device_count=4\ninit_error=9\n")
    record = run_gate(sealed_env(fake_nvml_lib, faults), tmp_path)
    assert (record["status"], record["reason"]) == (
        "UNHEALTHY",
        "gpus: NVML failed (init): Driver Not Loaded (code 9)",
    )


BANDWIDTH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from trainctl.health.host import allreduce_bandwidth
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    readings = allreduce_bandwidth(1 << 20, iterations=2, node=f"node{rank}")
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps([r.to_dict() for r in readings]))
    sys.stdout.flush()
    os._exit(0)  # no C++ teardown: it races with gloo's threads (see Runtime.exit)
    """
)


def test_allreduce_bandwidth_reports_every_rank(sealed_env: EnvFactory, tmp_path: Path) -> None:
    env = sealed_env(None, None)
    store = tmp_path / "pg-store"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", BANDWIDTH_SCRIPT, str(rank), str(store)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], [err for _, err in outputs]
    readings = json.loads(outputs[0][0])
    assert [(r["rank"], r["node"], r["world_size"]) for r in readings] == [
        (0, "node0", 2),
        (1, "node1", 2),
    ]
    for reading in readings:
        assert reading["size_bytes"] == 1 << 20 and reading["iterations"] == 2
        # ring all-reduce: bus bandwidth = 2(n-1)/n × algorithm bandwidth = 1× for n = 2
        assert reading["bus_gb_per_s"] == reading["algorithm_gb_per_s"] > 0
