"""The control loop against a fake cluster (the Ray shell replaced, the logic real): nodes
come and go, replicas load or fail, and the controller places, re-places and reports."""

from __future__ import annotations

import asyncio

from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.core import catalog
from orchestrator.machines import load_machines
from orchestrator.ray_actors import RayNode

MACHINES = {hw.name: hw for hw in load_machines()}


class FakeCluster:
    """Nodes declared by hardware files; every replica loads unless its model is in `broken`."""

    def __init__(self, names: list[str], broken: dict[str, str] | None = None) -> None:
        self.alive = {name: True for name in names}
        self.broken = broken or {}
        self.started: list[tuple[str, str, dict]] = []  # (node, replica id, settings)
        self.killed: list[str] = []
        self.crashed: set[str] = set()  # replica ids whose process died

    def list_nodes(self) -> list[RayNode]:
        return [RayNode(f"id-{n}", f"10.0.0.{i}", up, i == 0, n) for i, (n, up) in enumerate(self.alive.items())]

    def start_agent(self, node_id: str):
        return node_id.removeprefix("id-")

    async def report(self, agent: str, model_paths: dict, timeout_s: float) -> dict:
        if not self.alive[agent]:
            raise TimeoutError(agent)
        hardware = MACHINES[agent].model_copy(update={"source": "file"})
        return {"name": agent, "node_id": f"id-{agent}", "address": "10.0.0.1",
                "hardware": hardware.model_dump(mode="json"), "model_files": dict(model_paths), "reported_at": 0.0}

    async def read_shape(self, agent, path: str):
        return catalog.lookup(path.removesuffix(".gguf"))

    async def dry_run(self, agent, path, n_ctx, n_gpu_layers, kv_type, flash_attn) -> dict:
        return {"error": "no llama.cpp in this fake"}

    def start_replica(self, node_id: str, replica_id: str, settings: dict):
        self.started.append((node_id.removeprefix("id-"), replica_id, settings))
        return replica_id

    async def load(self, handle: str) -> dict:
        model = handle.split("#")[0]
        if model in self.broken:
            return {"state": "failed", "reason": self.broken[model]}
        return {"state": "ready", "memory": {"rss_bytes": 1 << 30, "vram_bytes": None}}

    async def info(self, handle: str, timeout_s: float) -> dict:
        if handle in self.crashed:
            raise ConnectionError(handle)  # stands for Ray's "actor died"
        return {"state": "ready"}

    def kill(self, handle) -> None:
        self.killed.append(handle)

    @staticmethod
    def is_dead_actor_error(exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)


def config(models: list[dict], **cluster) -> object:
    return parse_config({"models": models, "cluster": {"report_interval_s": 0.01, **cluster}})


def run_ticks(controller: Controller, n: int = 3) -> None:
    async def ticks():
        for _ in range(n):
            await controller.tick()
            await asyncio.sleep(0)  # let the load tasks finish
            await asyncio.sleep(0)

    asyncio.run(ticks())


def node_of(controller: Controller, model: str) -> str:
    return next(r.node_name for r in controller.replicas.values() if r.model == model)


LAB = ["desktop", "laptop-1", "laptop-2"]


def test_large_model_goes_to_the_desktop_and_small_ones_to_the_laptops():
    cluster = FakeCluster(LAB)
    controller = Controller(config([
        {"name": "coder", "path": "qwen2.5-coder-14b.gguf", "context": 4096},
        {"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf", "context": 4096},
        {"name": "llama", "path": "llama-3.1-8b.gguf", "context": 4096},
    ]), cluster)
    run_ticks(controller)
    assert node_of(controller, "coder") == "desktop"
    assert {node_of(controller, "r1"), node_of(controller, "llama")} == {"laptop-1", "laptop-2"}
    assert all(controller.model_state(m)[0] == "ready" for m in ("coder", "r1", "llama"))


def test_declared_gpu_memory_of_running_replicas_stays_reserved_across_ticks():
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([
        {"name": "a", "path": "deepseek-r1-distill-qwen-7b.gguf", "context": 4096},
        {"name": "b", "path": "deepseek-r1-distill-qwen-7b.gguf", "context": 4096},
    ]), cluster)
    run_ticks(controller, 5)
    kinds = sorted(r.assignment.kind for r in controller.replicas.values())
    assert kinds != ["gpu", "gpu"]  # one 6 GB card cannot hold two 5 GB models


def test_model_that_fails_to_load_is_failed_with_its_reason_while_the_others_serve():
    cluster = FakeCluster(LAB, broken={"bad": "not a GGUF file: /m/bad.gguf"})
    controller = Controller(config([
        {"name": "bad", "path": "llama-3.1-8b.gguf"},
        {"name": "good", "path": "llama-3.1-8b.gguf"},
    ]), cluster)
    run_ticks(controller, 4)
    assert controller.model_state("bad") == ("failed", "not a GGUF file: /m/bad.gguf")
    assert controller.model_state("good")[0] == "ready"
    assert sum(1 for _, rid, _ in cluster.started if rid.startswith("bad#")) == 1  # not retried in a loop


def test_replica_on_a_node_that_leaves_is_placed_again_on_a_node_still_there():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    run_ticks(controller)
    first = node_of(controller, "r1")
    cluster.alive[first] = False
    run_ticks(controller)
    assert node_of(controller, "r1") != first
    assert {n.name: n.alive for n in controller.nodes.values()}[first] is False
    assert controller.view().nodes[[n.name for n in controller.view().nodes].index(first)].state == "gone"


def test_placement_waits_for_the_expected_nodes_and_says_so():
    cluster = FakeCluster(["desktop"])
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}],
                                   wait_for_nodes=["laptop-1"]), cluster)
    run_ticks(controller)
    assert not controller.replicas
    assert controller.model_state("r1") == ("pending", "waiting for nodes to join: laptop-1")


def test_placement_goes_ahead_when_the_expected_nodes_do_not_come_in_time():
    cluster = FakeCluster(["desktop"])
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}],
                                   wait_for_nodes=["laptop-1"], wait_for_nodes_s=0), cluster)
    run_ticks(controller)
    assert node_of(controller, "r1") == "desktop"


def test_model_nobody_can_hold_is_pending_with_a_reason_per_node():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "huge", "path": "llama-2-70b.gguf", "context": 4096,
                                     "gpu_layers": -1}]), cluster)
    run_ticks(controller)
    state, reason = controller.model_state("huge")
    assert state == "pending"
    for node in LAB:
        assert f"{node}:" in reason


def test_catalog_only_model_is_explained_not_started():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "plan-only", "catalog": "llama-3.1-8b"}]), cluster)
    run_ticks(controller)
    assert not cluster.started
    assert "for `homefleet plan` and `fit` only" in controller.model_state("plan-only")[1]


def test_replica_whose_process_died_is_forgotten_and_started_again():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    run_ticks(controller)
    cluster.crashed.add("r1#0")
    run_ticks(controller, 1)
    assert "r1#0" in cluster.killed
    cluster.crashed.clear()
    run_ticks(controller, 2)
    assert controller.model_state("r1")[0] == "ready"
    assert sum(1 for _, rid, _ in cluster.started if rid == "r1#0") == 2
