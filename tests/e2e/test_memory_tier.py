"""End-to-end memory tier: real 2-node tiny-gpt jobs with ``checkpoint.memory`` on.

A SIGKILLed worker restores from the nodes' own memory (a newer step than durable storage
holds: at most the step in flight is replayed) and ends with the uninterrupted run's
fingerprint. A lost node's RAM is gone (the local scheduler removes its directory): with a
spare, the relaunch restores from the replica its peer held (tier ``peer``), with the
uninterrupted fingerprint; with a shrink from 2 nodes to 1 it reshards from that replica bit
for bit; without replicas it restores from durable storage and says why memory was skipped.
After each (`harness.launch`): no process of the job and no tmpfs directory of the job is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import events, final_loss, read_state, run, trainctl
from trainctl.checkpoint.layout import MEMORY_BASE, memory_root
from trainctl.checkpoint.memory import DURABLE_TIER, MEMORY_TIER, PEER_TIER

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.isdir(MEMORY_BASE), reason="no /dev/shm on this host"),
]
HEALTH = {"min_free_disk_gb": 0.05}
"""The gate checks /dev/shm's free space too; a container's default 64 MiB holds this model."""

MEMORY = {"interval_steps": 10, "keep_last": 2, "memory": {"enabled": True}}
"""Durable every 10 steps, memory every step: a fault at step 12 tells the tiers apart."""
PEER_PACE = {"step_sleep_s": 0.25}
"""A lost node restores from a replica while replication keeps within a step (the survivors
keep their two newest steps; README, memory tier): steps of this length leave the holders'
paced rounds (a tenth of a core each) that margin on a loaded 2-core machine."""


def _restores(storage: Path, job: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events(storage, job) if e["kind"] == "checkpoint_restored"]


def test_worker_kill_restores_from_memory(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path, storage, "memkill", "kill-worker:node-1@step=12", checkpoint=MEMORY, health=HEALTH
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "memkill")
    assert [a["cause"] for a in state["attempts"]] == ["worker_crash", None]
    restored = _restores(storage, "memkill")
    assert len(restored) == 1 and restored[0]["tier"] == MEMORY_TIER, restored
    # Durable storage holds step 10; memory holds the last step committed before the kill.
    assert restored[0]["step"] >= 11, restored
    assert state["attempts"][1]["restored_step"] == restored[0]["step"]
    assert not os.path.exists(memory_root("memkill"))
    # The report says which tier the restore used and how long it took.
    report = trainctl(
        "report", "memkill", "--json", "--out", str(tmp_path / "r.html"), storage=storage
    )
    assert report.returncode == 0, report.stderr
    second = report.json()["attempts"][1]
    assert second["restore_tier"] == MEMORY_TIER and second["restore_s"] > 0
    labels = [s["label"] for s in report.json()["segments"] if s["category"] == "restore"]
    assert any(label.endswith("from memory") for label in labels), labels


def test_node_loss_with_a_spare_restores_from_the_peers_replica(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path,
        storage,
        "memspare",
        "kill-node:node-1@step=12",
        spare_nodes=1,
        config=PEER_PACE,
        checkpoint=MEMORY,
        health=HEALTH,
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    state = read_state(storage, "memspare")
    assert [a["world_size"] for a in state["attempts"]] == [2, 2]
    restored = _restores(storage, "memspare")
    # node-1's shards came from the replica node-0 held; durable storage holds step 10 only,
    # so at most the step in flight at the kill (12) is replayed.
    assert len(restored) == 1 and restored[0]["tier"] == PEER_TIER, restored
    assert 11 <= restored[0]["step"] <= 12, restored
    assert state["attempts"][1]["restored_step"] == restored[0]["step"]
    assert not os.path.exists(memory_root("memspare"))


def test_node_loss_without_replicas_restores_durable_and_says_so(
    tmp_path: Path, storage: Path
) -> None:
    memory = {**MEMORY, "memory": {"enabled": True, "replicas": 0}}
    run(
        tmp_path,
        storage,
        "memnorep",
        "kill-node:node-1@step=12",
        min_nodes=1,
        checkpoint=memory,
        health=HEALTH,
    )
    state = read_state(storage, "memnorep")
    assert state["state"] == "succeeded" and [a["world_size"] for a in state["attempts"]] == [2, 1]
    restored = _restores(storage, "memnorep")
    assert len(restored) == 1 and restored[0]["tier"] == DURABLE_TIER, restored
    assert restored[0]["step"] == 10
    skipped = [e["data"] for e in events(storage, "memnorep") if e["kind"] == "restore_skipped"]
    assert any(s.get("tier") == MEMORY_TIER and "no valid copy" in s["reason"] for s in skipped), (
        skipped
    )


def test_a_corrupted_memory_copy_is_skipped_for_the_next_tier(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    # The kill first: node-0's workers then stop at the next collective, so they cannot write
    # two more steps over the flipped slots before the relaunch (corrupting first, a fast
    # node-0 did, and memory restored a clean step: the copy under test was gone).
    out = run(
        tmp_path,
        storage,
        "memcorrupt",
        "kill-worker:node-1@step=12",
        "corrupt-memory:node-0@step=12",
        checkpoint=MEMORY,
        health=HEALTH,
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    restored = _restores(storage, "memcorrupt")
    # node-0's own copies fail their checksums: its shards come from node-1's replica when
    # replication held that step, else from durable storage; never from the flipped copy.
    assert len(restored) == 1 and restored[0]["tier"] in (PEER_TIER, DURABLE_TIER), restored
    assert restored[0]["step"] >= 10, restored
    skipped = [e["data"] for e in events(storage, "memcorrupt") if e["kind"] == "restore_skipped"]
    assert any(
        s.get("tier") == MEMORY_TIER and "node-0" in s["reason"] and "checksum" in s["reason"]
        for s in skipped
    ), skipped


def test_shrink_reshards_from_the_peers_replica(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    run(
        tmp_path,
        storage,
        "memshrink",
        "kill-node:node-1@step=12",
        min_nodes=1,
        config=PEER_PACE,
        checkpoint=MEMORY,
        health=HEALTH,
    )
    state = read_state(storage, "memshrink")
    assert [a["world_size"] for a in state["attempts"]] == [2, 1]
    assert state["state"] == "succeeded" and state["final_step"] == 30
    restored = _restores(storage, "memshrink")
    # node-1's RAM is gone: its shards come from the replica node-0 held, resharded 2 -> 1.
    assert len(restored) == 1 and restored[0]["tier"] == PEER_TIER, restored
    assert (restored[0]["saved_world_size"], restored[0]["world_size"]) == (2, 1)
    items = events(storage, "memshrink")
    fingerprint = [e for e in items if e["kind"] == "restored_fingerprint"]
    step = fingerprint[0]["data"]["step"]
    assert step == restored[0]["step"] >= 11
    saved = [
        e
        for e in items
        if e["kind"] == "saved_fingerprint" and e["data"]["step"] == step and e["attempt"] == 0
    ]
    assert saved, f"no fingerprint saved at step {step}"
    # 2 ranks saved into memory, 1 rank restored: bit for bit the saved weights
    assert fingerprint[0]["data"]["fingerprint"] == saved[0]["data"]["fingerprint"]
    loss = final_loss(storage, "memshrink")
    assert abs(loss - baseline["loss"]) <= 1e-3 * abs(baseline["loss"])
    assert not os.path.exists(memory_root("memshrink"))


ONE_SLOT = {**MEMORY, "memory": {"enabled": True, "slots": 1}}
"""One slot per copy: a save is skipped while the slot's step is not yet replicated."""


def test_one_slot_worker_kill_restores_from_memory_bit_identically(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path,
        storage,
        "mem1kill",
        "kill-worker:node-1@step=12",
        checkpoint=ONE_SLOT,
        health=HEALTH,
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    restored = _restores(storage, "mem1kill")
    # The killed rank's own slot, or (killed mid-save) the replica of the step it held.
    assert len(restored) == 1 and restored[0]["tier"] in (MEMORY_TIER, PEER_TIER), restored
    assert restored[0]["step"] >= 10, restored
    assert not os.path.exists(memory_root("mem1kill"))


def test_one_slot_node_loss_with_a_spare_restores_from_the_replica(
    tmp_path: Path, storage: Path, baseline: dict[str, Any]
) -> None:
    out = run(
        tmp_path,
        storage,
        "mem1spare",
        "kill-node:node-1@step=12",
        spare_nodes=1,
        config=PEER_PACE,
        checkpoint=ONE_SLOT,
        health=HEALTH,
    )
    assert out["fingerprint"] == baseline["fingerprint"]
    restored = _restores(storage, "mem1spare")
    assert len(restored) == 1 and restored[0]["tier"] == PEER_TIER, restored
    assert restored[0]["step"] >= 10, restored
