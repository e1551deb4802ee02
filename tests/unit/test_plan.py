"""`homefleet plan`: the report (pure) and the command over hardware files and cluster views."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.cli import main
from orchestrator.cluster_view import ClusterView, ModelView, NodeView, ReplicaView
from orchestrator.commands.plan import make_plan, nodes_from_files, snapshots_from_view
from orchestrator.core.hardware import GIB, GpuInfo, NodeHardware
from orchestrator.core.memory import MemoryNeed
from orchestrator.core.placement import Assignment, ModelDemand, PlacementResult, Unplaced
from orchestrator.plan_report import NO_MODELS, plan_to_dict, render_plan

MACHINES_DIR = Path(__file__).resolve().parents[2] / "configs" / "machines"


def demand(model: str, weights_gib: float, n_layers: int = 32) -> ModelDemand:
    layer = weights_gib / n_layers

    def need(k: int) -> MemoryNeed:
        return MemoryNeed(int(((0.5 + k * layer) if k else 0) * GIB), int((1 + (n_layers - k) * layer) * GIB))

    return ModelDemand(model, 0, n_layers, need)


def test_default_nodes_are_the_three_reference_machines():
    nodes = nodes_from_files(None)
    assert [(n.name, n.gpus[0].vram_total_bytes // GIB, n.ram_free_bytes // GIB) for n in nodes] == [
        ("desktop", 16, 64),
        ("laptop-1", 6, 64),
        ("laptop-2", 6, 40),
    ]
    assert all(n.alive and n.model_files is None for n in nodes)


def test_report_lists_each_replica_with_gpu_layers_and_memory_then_reasons():
    nodes = nodes_from_files(None)
    result = make_plan(nodes, [demand("qwen-14b", 9, 49), demand("llama-7b", 4), demand("f16-70b", 130, 81)])
    text = render_plan(result, nodes)
    assert "qwen-14b  0        desktop   0: RTX 4070 Ti  49/49            9.5 GiB   1.0 GiB  gpu" in text
    assert "llama-7b  0        laptop-1  0: GTX 1660 Ti  32/32            4.5 GiB   1.0 GiB  gpu" in text
    assert "NOT PLACED\nf16-70b replica 0:\n    desktop: needs 130.5 GiB VRAM for 81 layers" in text
    assert text.count("\n    laptop-") == 2


def test_report_says_when_no_model_is_configured():
    nodes = nodes_from_files(None)
    assert NO_MODELS in render_plan(PlacementResult((), ()), nodes)


def test_report_shows_models_that_could_not_be_sized_and_replicas_without_nodes():
    result = PlacementResult((), (Unplaced("m", 0, {}),))
    text = render_plan(result, [], problems={"ghost": "cannot estimate its memory: no such file"})
    assert "no nodes to plan on" in text
    assert "ghost: cannot estimate its memory: no such file" in text
    assert "m replica 0:\n    no nodes in the cluster" in text


def test_json_plan_carries_bytes_as_integers():
    nodes = nodes_from_files(None)
    data = plan_to_dict(make_plan(nodes, [demand("llama-7b", 4)]), nodes)
    assert data["assignments"][0] == {
        "model": "llama-7b",
        "replica": 0,
        "node": "laptop-1",
        "gpu_index": 0,
        "gpu_layers": 32,
        "n_layers": 32,
        "gpu_bytes": int(4.5 * GIB),
        "ram_bytes": GIB,
        "kind": "gpu",
        "parallel": 1,
        "helpers": [],
        "tokens_per_s": None,
        "split_why": None,
    }
    assert data["nodes"][0]["gpus"][0]["vram_total_bytes"] == 16 * GIB
    json.dumps(data)


def _cluster_view() -> ClusterView:
    def hw(name: str, vram_free_gib: float) -> NodeHardware:
        gpu = GpuInfo(name="GTX 1060", vram_total_bytes=6 * GIB, vram_free_bytes=int(vram_free_gib * GIB))
        return NodeHardware(name=name, ram_total_bytes=40 * GIB, ram_available_bytes=30 * GIB, gpus=[gpu])

    return ClusterView(
        generated_at=0.0,
        nodes=[
            NodeView(name="a", address="10.0.0.1", hardware=hw("a", 1.0), model_files=["small"]),
            NodeView(name="b", address="10.0.0.2", hardware=hw("b", 6.0), model_files=["small"]),
            NodeView(name="gone", address="10.0.0.3", state="gone", hardware=hw("gone", 6.0)),
        ],
        models=[
            ModelView(
                name="small",
                context=4096,
                state="ready",
                replicas=[
                    ReplicaView(replica_id="small-0", node="a", state="ready", gpu_index=0, gpu_layers=32,
                                total_layers=32, estimated_gpu_bytes=4 * GIB, estimated_ram_bytes=GIB),
                    ReplicaView(replica_id="small-1", node="b", state="loading", gpu_index=0, gpu_layers=32,
                                total_layers=32, estimated_gpu_bytes=4 * GIB, estimated_ram_bytes=GIB),
                    ReplicaView(replica_id="small-2", state="pending", reason="no room"),
                ],
            )
        ],
    )


def test_live_cluster_nodes_keep_their_measured_free_memory_files_and_state():
    nodes, ready, loading = snapshots_from_view(_cluster_view())
    assert [(n.name, n.alive, n.gpus[0].vram_free_bytes, n.model_files) for n in nodes] == [
        ("a", True, GIB, frozenset({"small"})),
        ("b", True, 6 * GIB, frozenset({"small"})),
        ("gone", False, 6 * GIB, frozenset()),
    ]
    assert [(a.model, a.replica, a.node, a.kind) for a in ready] == [("small", 0, "a", "gpu")]
    assert [(a.replica, a.node) for a in loading] == [(1, "b")]


def test_plan_on_a_live_cluster_keeps_running_replicas_and_counts_loading_ones():
    nodes, ready, loading = snapshots_from_view(_cluster_view())
    demands = [ModelDemand("small", r, 32, demand("small", 3.5).need) for r in range(3)]
    result = make_plan(nodes, demands, ready, loading)
    kept, loaded, new = result.assignments
    assert (kept, loaded) == tuple(ready + loading)
    # b's measured 6 GiB free does not show the loading replica yet: its 4 GiB are reserved,
    # so the new replica only gets what is left of b's card (1.7 GiB), not the whole card.
    assert (new.node, new.kind, new.gpu_layers) == ("b", "split", 10)
    assert new.gpu_bytes <= 1.7 * GIB


def test_command_prints_the_plan_of_the_reference_machines(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "desktop" in out and "laptop-2" in out and NO_MODELS in out


def test_command_prints_json(capsys):
    assert main(["plan", "--json", "--nodes", str(MACHINES_DIR / "laptop-2.yaml")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in data["nodes"]] == ["laptop-2"]
    assert data["assignments"] == [] and data["unplaced"] == []


def test_command_names_a_bad_hardware_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nram_total_bytes: lots\n")
    assert main(["plan", "--nodes", str(bad)]) == 1
    assert f"homefleet plan: {bad}: ram_total_bytes" in capsys.readouterr().err


def test_command_rejects_nodes_and_url_together(capsys):
    assert main(["plan", "--url", "http://127.0.0.1:9", "--nodes", "x.yaml"]) == 1
    assert "either --nodes or --url" in capsys.readouterr().err


def test_command_names_a_bad_config_field(tmp_path, capsys):
    config = tmp_path / "homefleet.yaml"
    config.write_text("models:\n  - name: m\n    path: /m.gguf\n    contex: 10\n")
    assert main(["plan", "--config", str(config)]) == 1
    assert "models[0].contex: unknown field" in capsys.readouterr().err


def test_command_plans_catalog_models_with_the_real_estimate(tmp_path, capsys):
    config = tmp_path / "homefleet.yaml"
    config.write_text(
        "models:\n"
        "  - {name: coder-14b, catalog: qwen2.5-coder-14b, context: 8192}\n"
        "  - {name: tiny, catalog: gemma-3-270m, replicas: 2, node: laptop-2}\n"
        "  - {name: f16-70b, catalog: 'llama-2-70b:f16', context: 4096}\n"
        "  - {name: mystery, path: /nowhere/mystery.gguf, catalog: not-a-model}\n"
    )
    assert main(["plan", "--json", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    placed = {(a["model"], a["replica"]): (a["node"], a["kind"]) for a in data["assignments"]}
    assert placed == {
        ("coder-14b", 0): ("desktop", "gpu"),  # 14B Q4_K_M at 8k: too big for the 6 GiB laptops
        ("tiny", 0): ("laptop-2", "gpu"),
        ("tiny", 1): ("laptop-2", "gpu"),
    }
    (f16,) = data["unplaced"]
    assert f16["model"] == "f16-70b" and sorted(f16["reasons"]) == [
        "across machines (RPC)", "desktop", "laptop-1", "laptop-2"]
    assert "usable VRAM" in f16["reasons"]["across machines (RPC)"]  # too big for all three GPUs together
    assert data["problems"]["mystery"].startswith("cannot estimate its memory: /nowhere/mystery.gguf is not on")


def test_running_assignment_round_trips_through_the_report():
    kept = Assignment("m", 0, "desktop", None, 0, 32, 0, 5 * GIB, "cpu")
    text = render_plan(PlacementResult((kept,), ()), nodes_from_files(None))
    assert "m      0        desktop  -    0/32                   -   5.0 GiB  cpu" in text


def test_report_shows_the_slots_each_replica_got():
    from dataclasses import replace

    kept = Assignment("m", 0, "desktop", None, 0, 32, 0, 5 * GIB, "cpu")
    text = render_plan(PlacementResult((kept, replace(kept, replica=1, parallel=4)), ()), nodes_from_files(None))
    assert "KIND  SLOTS" in text
    assert "5.0 GiB  cpu   1" in text and "5.0 GiB  cpu   4" in text


def test_live_replicas_keep_the_slots_they_run_with():
    view = _cluster_view()
    view.models[0].replicas[0].slots = 4
    _, ready, loading = snapshots_from_view(view)
    assert [a.parallel for a in ready + loading] == [4, 1]
