"""Pure planning: argv and env per node, deterministic, printable."""

from __future__ import annotations

from trainctl.checkpoint.layout import MEMORY_BASE
from trainctl.launch.plan import Facts, GatePlan, LaunchPlan, plan_attempt, render_plan
from trainctl.spec import CheckpointSpec, HealthSpec, JobSpec, MemoryTierSpec

SPEC = JobSpec(
    name="t",
    script="/r/train.py",
    args=("--lr", "0.1"),
    nodes=2,
    nproc_per_node=2,
    max_steps=5,
    seed=3,
    env={"EXTRA": "1"},
    config={"dim": 8},
)
FACTS = Facts(
    python="/py",
    storage_root="/store",
    run_dir="/store/jobs/j",
    rdzv_port=29555,
    checkpoint_root="/store/checkpoints/j",
)


def test_plan_has_one_torchrun_per_node() -> None:
    plan = plan_attempt(SPEC, FACTS, "j", 1, ("node-0", "node-1"))
    assert plan.world_size == 4 and plan.rdzv_endpoint == "127.0.0.1:29555"
    assert [n.name for n in plan.nodes] == ["node-0", "node-1"]
    argv = plan.nodes[0].argv
    assert argv[:3] == ("/py", "-m", "torch.distributed.run")
    assert "--nnodes=2" in argv and "--nproc-per-node=2" in argv
    assert "--rdzv-backend=c10d" in argv and "--rdzv-id=j-a1" in argv
    assert any(a.startswith("--rdzv-conf=is_host=false,") for a in argv)
    assert argv[-3:] == ("/r/train.py", "--lr", "0.1")
    env = plan.nodes[1].env_dict()
    assert env["TRAINCTL_NODE"] == "node-1" and env["TRAINCTL_ATTEMPT"] == "1"
    assert env["TRAINCTL_MAX_STEPS"] == "5" and env["TRAINCTL_SEED"] == "3"
    assert env["TRAINCTL_CONFIG"] == '{"dim":8}' and env["EXTRA"] == "1"
    assert plan.nodes[1].log_path == "/store/jobs/j/logs/node-1.log"
    assert list(env) == sorted(env)


def test_plan_is_deterministic_and_round_trips() -> None:
    a = plan_attempt(SPEC, FACTS, "j", 0, ("node-0", "node-1"), excluded=("node-2",))
    b = plan_attempt(SPEC, FACTS, "j", 0, ("node-0", "node-1"), excluded=("node-2",))
    assert a == b
    assert LaunchPlan.from_json(a.to_json()) == a
    assert render_plan(a) == render_plan(b)
    assert "excluded: node-2" in render_plan(a)


def test_unknown_port_is_shown_as_placeholder() -> None:
    facts = Facts(python="/py", storage_root="/s", run_dir="/s/j")
    plan = plan_attempt(SPEC, facts, "j", 0, ("node-0",))
    assert plan.rdzv_endpoint == "127.0.0.1:<rdzv-port>"
    assert "--rdzv-endpoint=127.0.0.1:<rdzv-port>" in plan.nodes[0].argv


def test_node_env_reaches_only_its_node_and_wins_over_env() -> None:
    spec = SPEC.model_copy(
        update={"node_env": {"node-1": {"FAKE_NVML_FILE": "/f/xid.nvml", "EXTRA": "2"}}}
    )
    plan = plan_attempt(spec, FACTS, "j", 0, ("node-0", "node-1"))
    node0, node1 = (n.env_dict() for n in plan.nodes)
    assert "FAKE_NVML_FILE" not in node0 and node0["EXTRA"] == "1"
    assert node1["FAKE_NVML_FILE"] == "/f/xid.nvml" and node1["EXTRA"] == "2"
    assert "  FAKE_NVML_FILE=/f/xid.nvml" in render_plan(plan)


def test_gate_settings_come_from_the_health_section_and_print() -> None:
    spec = SPEC.model_copy(
        update={
            "health": HealthSpec(probe_interval_s=0, min_free_disk_gb=20, require_nvml=True),
        }
    )
    plan = plan_attempt(spec, FACTS, "j", 0, ("node-0",))
    assert plan.gate == GatePlan(
        paths=("/store/jobs/j", "/store", "/store/checkpoints/j"),
        min_free_disk_gb=20,
        require_nvml=True,
        probe_interval_s=0,
    )
    assert LaunchPlan.from_json(plan.to_json()) == plan
    assert render_plan(plan).splitlines()[1] == (
        "health gate: free disk >= 20 GiB at /store/jobs/j, /store, /store/checkpoints/j; "
        "rendezvous reachable; NVML required; no re-probes while running"
    )
    assert plan.nodes[0].env_dict()["TRAINCTL_STOP_GRACE_S"] == "5"


def test_memory_tier_puts_the_hosts_tmpfs_under_the_gate() -> None:
    memory = CheckpointSpec(interval_steps=10, memory=MemoryTierSpec(enabled=True))
    plan = plan_attempt(SPEC.model_copy(update={"checkpoint": memory}), FACTS, "j", 0, ("n",))
    assert plan.gate.paths[-1] == MEMORY_BASE
    plain = plan_attempt(SPEC, FACTS, "j", 0, ("n",))
    assert MEMORY_BASE not in plain.gate.paths
