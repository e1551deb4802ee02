"""The reference home lab on loopback: `homefleet up` as the desktop and two `homefleet join`
as the laptops, each a real Ray node reporting a seed machine's hardware file, with real
GGUFs whose estimates force each placement rule; chats are served where placement put them.

The seed machines are declared with live use (free VRAM and RAM) scaled to this 24 GB test
box, the way a busy desktop reports itself; the placement rules do not change with scale.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import httpx
import pytest

from orchestrator.config import load_config
from orchestrator.core.placement import Assignment, place, snapshot_from_hardware
from orchestrator.demand import default_shape_loader, demands_for
from orchestrator.machines import load_hardware_file
from tests.gguf_factory import write_gguf
from tests.support import (
    child_env,
    homefleet_command,
    homefleet_join,
    homefleet_up,
    ray_address_of,
    replica_of,
    write_config,
)
from tests.support import declared_machine as support_declared_machine

pytestmark = pytest.mark.integration

GIB = 1024**3
MACHINES = {
    # name: (seed file, declared free VRAM, declared available RAM, loopback address)
    "desktop": ("configs/machines/desktop.yaml", 2.5 * GIB, 8 * GIB, "127.0.0.2"),
    "laptop-1": ("configs/machines/laptop-1.yaml", 0.9 * GIB, 6 * GIB, "127.0.0.3"),
    "laptop-2": ("configs/machines/laptop-2.yaml", 0.9 * GIB, 6 * GIB, "127.0.0.4"),
}


def declared_machine(tmp_path, name: str) -> str:
    seed, vram_free, ram_available, _ = MACHINES[name]
    return support_declared_machine(tmp_path, name, seed, vram_free, ram_available)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    models_dir = tmp / "models"
    models_dir.mkdir()
    # Estimates (whole on GPU): small ~0.4 GiB, big ~1.1 GiB, huge ~2.7 GiB, nowhere ~42 GiB of KV.
    small = write_gguf(models_dir / "small.gguf", n_layers=2, n_embd=256, n_ff=512, n_vocab=1024)
    big = write_gguf(models_dir / "big.gguf", n_layers=8, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4,
                     n_vocab=1024, sparse=True)
    huge = write_gguf(models_dir / "huge.gguf", n_layers=12, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=4,
                      n_vocab=1024, sparse=True)
    nowhere = write_gguf(models_dir / "nowhere.gguf", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_vocab=1024)
    config = write_config(
        tmp / "lab.yaml",
        [
            {"name": "small-a", "path": str(small), "context": 1024, "chat_format": "chatml"},
            {"name": "small-b", "path": str(small), "context": 1024, "chat_format": "chatml"},
            {"name": "big", "path": str(big), "context": 1024, "chat_format": "chatml"},
            {"name": "huge", "path": str(huge), "context": 1024, "chat_format": "chatml"},
            {"name": "nowhere", "path": str(nowhere), "context": 1048576, "chat_format": "chatml"},
        ],
        cluster={"wait_for_nodes": ["laptop-1", "laptop-2"]},
    )
    env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                    RAY_health_check_failure_threshold="4")
    _, _, _, head_ip = MACHINES["desktop"]
    declared = {name: declared_machine(tmp, name) for name in MACHINES}
    with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", declared["desktop"],
                      env=env) as head:
        head.node_ip = head_ip
        address = ray_address_of(head)
        with contextlib.ExitStack() as stack:
            joined = {}
            for name in ("laptop-1", "laptop-2"):  # one at a time, as people switch laptops on
                joined[name] = stack.enter_context(
                    homefleet_join(tmp, address, name, MACHINES[name][3], "--hardware", declared[name], env=env)
                )
                head.wait_for_nodes([name], timeout_s=120)
            view = head.wait_for_models(
                {"small-a": {"ready"}, "small-b": {"ready"}, "big": {"ready"}, "huge": {"ready"}, "nowhere": {"pending"}},
                timeout_s=240,
            )
            yield {"head": head, **joined, "first_view": view, "config": config, "declared": declared}


def test_every_seed_machine_joins_and_reports_its_declared_hardware(lab):
    nodes = {n["name"]: n for n in lab["first_view"]["nodes"]}
    assert set(nodes) == {"desktop", "laptop-1", "laptop-2"}
    assert nodes["desktop"]["hardware"]["gpus"][0]["name"] == "NVIDIA GeForce RTX 4070 Ti"
    assert nodes["laptop-2"]["hardware"]["ram_total_bytes"] == 40 * GIB
    assert {n["address"] for n in nodes.values()} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert all(n["state"] == "alive" for n in nodes.values())


def test_model_only_the_big_card_holds_goes_whole_to_the_desktop(lab):
    replica = replica_of(lab["first_view"], "big")
    assert replica["node"] == "desktop" and replica["processor"] == "100% GPU"


def test_small_models_go_to_the_laptops_though_the_desktop_has_room(lab):
    nodes = {replica_of(lab["first_view"], m)["node"] for m in ("small-a", "small-b")}
    assert nodes == {"laptop-1", "laptop-2"}


def test_model_no_card_holds_whole_is_split_between_gpu_and_cpu(lab):
    replica = replica_of(lab["first_view"], "huge")
    assert 0 < replica["gpu_layers"] < replica["total_layers"]
    assert "CPU/GPU" in replica["processor"]


def test_model_that_fits_nowhere_is_pending_with_one_reason_per_node_in_numbers(lab):
    model = next(m for m in lab["first_view"]["models"] if m["name"] == "nowhere")
    for node in ("desktop", "laptop-1", "laptop-2"):
        assert f"{node}: needs" in model["reason"]
    assert "GiB" in model["reason"]


def placement_on_declared_hardware(config_path, hardware_files) -> dict[str, Assignment]:
    """Where the placement rules put each model, worked out here: the pure `place()` over the
    declared machine files and the lab's GGUF headers, nothing asked of the running cluster."""
    config = load_config(config_path)
    nodes = [snapshot_from_hardware(load_hardware_file(path)) for path in hardware_files]
    return {a.model: a for a in place(nodes, demands_for(config.models, default_shape_loader)).assignments}


@pytest.fixture(scope="module")
def rules_pick(lab) -> dict[str, Assignment]:
    picked = placement_on_declared_hardware(lab["config"], lab["declared"].values())
    assert set(picked) == {"small-a", "small-b", "big", "huge"}
    return picked


def chat_served_by(head, model: str) -> str:
    reply = httpx.post(
        f"{head.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    return reply.headers["x-homefleet-node"]


# Same file, same context: the rules cannot tell them apart, so the controller may place either
# first (whichever's header is read first) and either may get the laptop the rules name first.
TWINS = {"small-a": "small-b", "small-b": "small-a"}


@pytest.mark.parametrize("model", ["small-a", "small-b", "big", "huge"])
def test_chat_is_served_by_the_node_the_rules_pick_from_the_declared_hardware(lab, rules_pick, model):
    head = lab["head"]
    served = chat_served_by(head, model)
    if model in TWINS:
        twin = TWINS[model]
        assert {served, chat_served_by(head, twin)} == {rules_pick[model].node, rules_pick[twin].node}
    else:
        assert served == rules_pick[model].node
    served_counts = {n["name"]: n["requests_served"] for n in head.cluster()["nodes"]}
    assert served_counts[served] >= 1


def test_model_that_fits_nowhere_answers_503_with_its_reason(lab):
    reply = httpx.post(
        f"{lab['head'].url}/v1/chat/completions",
        json={"model": "nowhere", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert "laptop-1: needs" in reply.json()["error"]["message"]


def kind_of(replica: dict) -> str:
    """A live replica's kind from its layers: all on the GPU, some, or none."""
    if replica["helpers"]:
        return "rpc"
    if replica["gpu_layers"] <= 0:
        return "cpu"
    return "gpu" if replica["gpu_layers"] >= replica["total_layers"] else "split"


def test_plan_against_the_live_cluster_agrees_with_the_placement(lab):
    out = subprocess.run(
        homefleet_command("plan", "--url", lab["head"].url, "--json", "--config", str(lab["config"])),
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    view = lab["head"].cluster()
    live = {m["name"]: [(r["node"], kind_of(r), r["gpu_layers"]) for r in m["replicas"] if r["state"] == "ready"]
            for m in view["models"]}
    planned = {}
    for a in plan["assignments"]:
        planned.setdefault(a["model"], []).append((a["node"], a["kind"], a["gpu_layers"]))
    assert planned == {model: replicas for model, replicas in live.items() if replicas}
    placed_nowhere = {model for model, replicas in live.items() if not replicas}
    assert placed_nowhere == {"nowhere"}
    assert {u["model"] for u in plan["unplaced"]} == placed_nowhere
    (nowhere,) = plan["unplaced"]
    # one reason per node, and why its layers do not fit the three RPC-capable cards together
    assert set(nowhere["reasons"]) == {"desktop", "laptop-1", "laptop-2", "across machines (RPC)"}


def test_a_node_that_leaves_is_shown_gone_within_the_health_check_time(lab):
    """Last in this module: it takes laptop-2 away. Health check here: 4 x 500 ms."""
    head, laptop = lab["head"], lab["laptop-2"]
    raylets = [p for p in laptop.descendants() if "raylet" in " ".join(p.cmdline())]
    assert raylets
    for proc in laptop.descendants():  # the machine vanishes: no goodbye to the head
        proc.kill()
    laptop.popen.kill()
    started = time.monotonic()
    state = None
    while time.monotonic() - started < 20:
        nodes = {n["name"]: n["state"] for n in head.cluster()["nodes"]}
        state = nodes.get("laptop-2")
        if state == "gone":
            break
        time.sleep(0.25)
    gone_after_s = time.monotonic() - started
    assert state == "gone", f"laptop-2 still {state} after {gone_after_s:.1f}s"
    assert gone_after_s < 10
    # The model it served is placed again on a node that is still there.
    view = head.wait_for_models({"small-b": {"ready"}}, timeout_s=120)
    assert replica_of(view, "small-b")["node"] in ("desktop", "laptop-1")
