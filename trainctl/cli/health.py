"""`trainctl health [JOB]`: probe this machine, or show a job's node verdicts (issue 4).

Without JOB: run the node gate's probes here (GPUs through NVML, disk at the storage root and
any `--path`, memory, optionally `--endpoint`) and print a table on stderr, or the result as
JSON on stdout with `--json`. With JOB: show each node's latest verdict from the job store
(``jobs/<JOB>/nodes/<node>.json``) and its GPUs' latest utilisation readings (util, memory,
power, temperature, SM clock, throttle reasons, ECC; ``jobs/<JOB>/gpu/``). Exit status 1 when
anything is UNHEALTHY, else 0.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from trainctl.cli.common import (
    JSON_OPTION,
    STORAGE_OPTION,
    read_node_verdicts,
    resolve_job_id,
    warn_skipped,
)
from trainctl.cli.console import emit_json, emit_table, format_age, terminal
from trainctl.cli.times import wall_and_age
from trainctl.errors import NotFoundError, UserError
from trainctl.exitcodes import ExitCode
from trainctl.health.gate import GateConfig, GateResult, preflight
from trainctl.health.readings import GpuUtilisation, NvmlStatus
from trainctl.health.utilisation import NodeSample, clock_reason_names
from trainctl.health.verdict import (
    GIB,
    HealthVerdict,
    NodeVerdictRecord,
    Verdict,
    worst_status,
)
from trainctl.report.gpu import gpu_readings_json, read_gpu_series, stored_health
from trainctl.state import JobRecord
from trainctl.store import JobStore, resolve_storage_root

_STYLE = {Verdict.OK: "green", Verdict.DEGRADED: "yellow", Verdict.UNHEALTHY: "red"}


def health(
    job_id: str | None = typer.Argument(
        None, help="Show this job's node verdicts instead (its id, or a unique prefix)."
    ),
    as_json: bool = JSON_OPTION,
    storage: str | None = STORAGE_OPTION,
    paths: list[str] = typer.Option(
        [], "--path", help="Also check free disk space here (repeatable)."
    ),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Check that HOST:PORT accepts a TCP connection."
    ),
    min_free_gb: float = typer.Option(
        1.0, "--min-free-gb", help="Free disk space required at each path, in GiB."
    ),
) -> None:
    """Probe this machine's GPUs (NVML) and host, or show a job's last node verdicts."""
    root = resolve_storage_root(storage)
    if job_id is None:
        statuses = [_probe_here(root, paths, endpoint, min_free_gb, as_json)]
    else:
        store = JobStore(root)
        store.check_root()  # a missing or unreachable root is said first, once
        statuses = _show_job(root, resolve_job_id(store, job_id), as_json)
    if worst_status(statuses) is Verdict.UNHEALTHY:
        raise typer.Exit(int(ExitCode.FAILED))


# --- this machine ------------------------------------------------------------------------------


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            "expected HOST:PORT", where="--endpoint", value=text, fix="e.g. --endpoint head:29400"
        )
    return host.strip("[]"), int(port)


def _probe_here(
    root: str, paths: list[str], endpoint: str | None, min_free_gb: float, as_json: bool
) -> Verdict:
    if min_free_gb < 0:
        raise UserError("must not be negative", where="--min-free-gb", value=min_free_gb)
    config = GateConfig(
        paths=(root, *paths),
        min_free_disk_bytes=int(min_free_gb * GIB),
        rendezvous=None if endpoint is None else _parse_endpoint(endpoint),
    )
    result = preflight(config)
    if as_json:
        emit_json(result.to_dict())
    else:
        _print_probe(result)
    return result.verdict.status


def _status_text(status: Verdict) -> Text:
    return Text(status.value, style=_STYLE[status])


def _part(verdict: HealthVerdict, subject: str) -> HealthVerdict | None:
    """A sub-verdict stored in a worst-of evidence dict, if present."""
    data = verdict.evidence.get(subject)
    return HealthVerdict.from_dict(data) if isinstance(data, dict) and "status" in data else None


def _gpu_detail(verdict: HealthVerdict) -> str:
    """The reason when something is wrong; for a healthy GPU its name and temperature."""
    reading = verdict.evidence.get("reading", {})
    if verdict.status is not Verdict.OK or not isinstance(reading, dict):
        return verdict.reason
    facts = [str(reading["name"])] if reading.get("name") else []
    if reading.get("temperature_c") is not None:
        facts.append(f"{reading['temperature_c']} °C")
    return ", ".join(facts) or verdict.reason


def _print_probe(result: GateResult) -> None:
    console = terminal.out  # the checks and the verdict are the command's answer: stdout
    nvml = result.nvml
    if nvml.status is not NvmlStatus.AVAILABLE:
        terminal.info(escape(nvml.message))
    table = Table(box=None, pad_edge=False, title=f"health of {escape(result.host.hostname)}")
    for column in ("CHECK", "STATUS", "DETAIL"):
        table.add_column(column)
    gpus = _part(result.verdict, "gpus")
    if gpus is not None:
        per_gpu = [(k, _part(gpus, k)) for k in gpus.evidence if k.startswith("gpu")]
        if per_gpu:
            for subject, verdict in per_gpu:
                if verdict is not None:
                    table.add_row(subject, _status_text(verdict.status), _gpu_detail(verdict))
        else:
            table.add_row("gpus", _status_text(gpus.status), gpus.reason)
    host = _part(result.verdict, "host")
    if host is not None:
        for subject in host.evidence:
            part = _part(host, subject)
            if part is not None:
                table.add_row(subject, _status_text(part.status), part.reason)
    for path in result.skipped_paths:
        table.add_row(f"disk {path}", "-", "object store: no local disk to measure")
    console.print(table)
    status = result.verdict.status
    console.print(Text.assemble("verdict: ", _status_text(status), f": {result.verdict.reason}"))


# --- a job's nodes -----------------------------------------------------------------------------


def read_node_records(root: str, job_id: str) -> dict[str, dict[str, Any]]:
    """Raw ``nodes/<node>.json`` documents of a job, by node name.

    Raises NotFoundError when the job has neither state nor node verdicts.
    """
    store = JobStore(root)
    store.check_root()
    records = read_node_verdicts(store, job_id)
    if not records and not store.exists(job_id):
        raise NotFoundError(
            "no such job",
            where=root,
            value=job_id,
            fix="run `trainctl list` to see the jobs in this storage root (or pass --storage)",
        )
    return records


def _opt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _gpu_row(node: str, gpu: GpuUtilisation) -> list[str]:
    memory = "-"
    if gpu.memory_used_bytes is not None and gpu.memory_total_bytes:
        memory = f"{gpu.memory_used_bytes / GIB:.1f}/{gpu.memory_total_bytes / GIB:.1f}G"
    power = _opt(gpu.power_w, "W")
    if gpu.power_w is not None and gpu.power_limit_w is not None:
        power += f"/{gpu.power_limit_w:.0f}W"
    clock = _opt(gpu.sm_clock_mhz)
    if gpu.sm_clock_mhz is not None and gpu.sm_clock_max_mhz is not None:
        clock += f"/{gpu.sm_clock_max_mhz}"
    ecc = "-"
    if gpu.ecc_corrected_volatile is not None or gpu.ecc_uncorrected_volatile is not None:
        ecc = f"{_opt(gpu.ecc_corrected_volatile)}/{_opt(gpu.ecc_uncorrected_volatile)}"
    reasons = clock_reason_names(gpu.clock_event_reasons)
    if gpu.errors:
        reasons = [*reasons, f"errors: {', '.join(e.probe for e in gpu.errors)}"]
    return [
        node,
        str(gpu.index),
        _opt(gpu.gpu_util_pct, "%"),
        memory,
        power,
        _opt(gpu.temperature_c, "C"),
        clock,
        ecc,
        ", ".join(reasons) or ("-" if gpu.clock_event_reasons is None else "none"),
    ]


def _print_gpus(job_id: str, latest: dict[str, NodeSample]) -> None:
    """The latest per-GPU readings: one row per GPU (a node without GPUs says why)."""
    table = Table(box=None, pad_edge=False, title=f"GPUs of {escape(job_id)}, latest sample")
    for column in (
        "NODE",
        "GPU",
        "UTIL",
        "MEMORY",
        "POWER",
        "TEMP",
        "SM MHZ",
        "ECC C/U",
        "THROTTLE",
    ):
        table.add_column(column)
    now = time.time()
    for node, row in latest.items():
        for gpu in row.sample.gpus:
            table.add_row(*(Text(cell) for cell in _gpu_row(node, gpu)))
        if not row.sample.gpus:
            table.add_row(node, "-", Text(row.sample.message or "no GPUs"))
    emit_table(table)
    for node, row in latest.items():
        terminal.detail(escape(f"{node}: sampled {format_age(now - row.time)} ago ({row.phase})"))


def node_standing(
    record: JobRecord | None, blocklist: dict[str, dict[str, Any]], now: float
) -> dict[str, str]:
    """Each node's standing in the job, shown beside its last verdict: a verdict says how the
    node was when it was checked, not whether it is still in the job. Its state in
    ``state.json`` (running, failed: lost or crashed, stopped, spare, ...), or ``excluded``
    while the job's blocklist holds it."""
    standing = {} if record is None else {node.name: node.state.value for node in record.nodes}
    for node, entry in blocklist.items():
        if float(entry.get("expires_at", 0)) > now:
            standing[node] = "excluded"
    return standing


def _standing(store: JobStore, job_id: str, now: float) -> dict[str, str]:
    record = store.read_state(job_id) if store.exists(job_id) else None
    return node_standing(record, store.read_blocklist(job_id), now)


def _show_job(root: str, job_id: str, as_json: bool) -> list[Verdict]:
    raw = read_node_records(root, job_id)
    store = JobStore(root)
    now = time.time()
    standing = _standing(store, job_id, now)
    series = read_gpu_series(store, job_id, last_s=stored_health(store, job_id).gpu_idle_window_s)
    warn_skipped(series.problems)
    latest = series.latest()
    records: dict[str, NodeVerdictRecord] = {}
    unreadable: dict[str, str] = {}
    for node, data in sorted(raw.items()):
        try:
            records[node] = NodeVerdictRecord.from_dict(data)
        except ValueError as bad:
            unreadable[node] = str(bad)
    statuses = [record.verdict.status for record in records.values()]
    if as_json:
        nodes: dict[str, Any] = {node: record.to_dict() for node, record in records.items()}
        nodes |= {node: {"node": node, "error": error} for node, error in unreadable.items()}
        for node, data in nodes.items():
            data["state"] = standing.get(node)
        gpus = {node: gpu_readings_json(row) for node, row in latest.items()}
        status = worst_status(statuses).value
        emit_json({"job_id": job_id, "status": status, "nodes": nodes, "gpus": gpus})
        return statuses
    if not records and not unreadable:
        terminal.info(f"{job_id}: no node verdicts yet")
        if latest:
            _print_gpus(job_id, latest)
        return statuses
    table = Table(box=None, pad_edge=False, title=f"node health of {escape(job_id)}")
    for column in ("NODE", "STATE", "LAST VERDICT", "CHECKED", "REASON"):
        table.add_column(column, no_wrap=column != "REASON")  # REASON wraps, times never
    for node, record in records.items():
        table.add_row(
            node,
            standing.get(node, "?"),
            _status_text(record.verdict.status),
            wall_and_age(record.checked_at, now),
            Text(f"{record.phase}: {record.verdict.reason}"),  # when in the node's life
        )
    for node, error in unreadable.items():
        table.add_row(node, standing.get(node, "?"), "?", "", f"unreadable record: {error}")
    emit_table(table)
    if latest:
        _print_gpus(job_id, latest)
    for node, record in records.items():
        evidence = json.dumps(record.verdict.evidence, sort_keys=True)
        terminal.detail(escape(f"{node} evidence: {evidence}"))
    return statuses
