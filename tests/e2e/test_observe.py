"""End-to-end: one real 2-node job watched three ways: the controller's live ``/metrics``
(`launch --metrics-port 0`) scraped while it runs, `trainctl metrics JOB` from the store once
it ended, and `trainctl top JOB --once`. Both expositions are parsed with the parser of
prometheus_client and checked against the job store.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO
from tests.e2e.harness import (
    JOB_TIMEOUT_S,
    assert_no_leftovers,
    events,
    read_state,
    start_launch,
    trainctl,
)

pytestmark = pytest.mark.e2e

TINY = str(REPO / "recipes" / "tiny-gpt.yaml")
JOB = "observe-a"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> tuple[dict[str, str], Samples]:
    """(family -> type, (sample name, labels without job_id) -> value) of an exposition."""
    types: dict[str, str] = {}
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            assert sample.labels.get("job_id") == JOB, sample
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "job_id"))
            values[(sample.name, labels)] = sample.value
    return types, values


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None  # not yet, or the controller has ended


def test_metrics_live_and_from_the_store_and_top(storage: Path) -> None:
    proc = start_launch(
        TINY,
        *("--max-steps", "30", "--metrics-port", "0"),
        job_id=JOB,
        storage=storage,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("metrics: http://127.0.0.1:"), first
    url = first.split()[1]
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.extend(proc.stderr or ()), daemon=True)
    drain.start()
    scrapes: list[Samples] = []
    types: dict[str, str] = {}
    try:
        while proc.poll() is None:
            text = scrape(url)
            if text:
                types, values = samples(text)
                scrapes.append(values)
            threading.Event().wait(0.3)
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        drain.join(timeout=10)
        assert_no_leftovers(JOB)
    assert proc.returncode == 0, "".join(rest)

    # -- live, from the controller's memory ------------------------------------------------
    running = [
        values
        for values in scrapes
        if values.get(("trainctl_job_state", (("state", "running"),))) == 1
    ]
    assert running, f"no scrape while the job ran ({len(scrapes)} scrapes)"
    assert types["trainctl_steps"] == "counter"
    assert types["trainctl_step_time_seconds"] == "histogram"
    steps = [values[("trainctl_steps_total", ())] for values in running]
    assert steps == sorted(steps), "a counter never goes down"
    stepping = [v for v in running if 1 <= v[("trainctl_steps_total", ())] < 30]
    assert stepping, f"a scrape saw training in progress (steps seen: {steps})"
    live = stepping[-1]
    counts = [v[("trainctl_step_time_seconds_count", ())] for v in running]
    assert counts == sorted(counts)
    assert live[("trainctl_step_time_seconds_count", ())] > 0
    assert ("trainctl_node_step", (("node", "node-0"),)) in live
    assert ("trainctl_node_heartbeat_age_seconds", (("node", "node-1"),)) in live

    # -- from the store, after the end -------------------------------------------------------
    state = read_state(storage, JOB)
    stored = events(storage, JOB)
    result = trainctl("metrics", JOB, storage=storage)
    assert result.returncode == 0, result.stderr
    types, values = samples(result.stdout)
    assert types["trainctl_restarts"] == "counter"
    assert values[("trainctl_job_state", (("state", "succeeded"),))] == 1
    assert values[("trainctl_steps_total", ())] == state["step"] == 30
    assert state["restarts"] == {}
    assert not [key for key in values if key[0] == "trainctl_restarts_total"]
    assert values[("trainctl_checkpoint_committed_step", ())] == state["committed_step"]
    commits = [e for e in stored if e["kind"] == "checkpoint_committed"]
    restores = [e for e in stored if e["kind"] == "checkpoint_restored"]
    assert values[("trainctl_checkpoint_stall_seconds_count", ())] == len(commits) >= 3
    assert values[("trainctl_checkpoint_stall_seconds_sum", ())] == pytest.approx(
        sum(e["data"]["stall_s"] for e in commits)
    )
    assert values[("trainctl_checkpoint_restore_seconds_count", ())] == len(restores) == 0
    for node in ("node-0", "node-1"):
        assert values[("trainctl_node_step", (("node", node),))] == 30
        assert values[("trainctl_node_health", (("node", node), ("status", "OK")))] == 1
    # One observation per rank per timed step: a worker's first step has no time (nothing
    # before it to measure from), so both ranks' steps 2..30, each counted once.
    assert values[("trainctl_step_time_seconds_count", ())] == 2 * 29
    assert values[("trainctl_excluded_nodes", ())] == 0

    top = trainctl("top", JOB, "--once", storage=storage, COLUMNS="100")
    assert top.returncode == 0, top.stderr
    assert "succeeded  attempt 0  step 30" in top.stdout
    rows = [line.split() for line in top.stdout.splitlines() if line.startswith("node-")]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        ("node-0", "succeeded", "30"),
        ("node-1", "succeeded", "30"),
    ]
