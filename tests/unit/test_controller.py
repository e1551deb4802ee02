"""The control loop against a fake cluster (the Ray shell replaced, the logic real): nodes
come and go, replicas load or fail, and the controller places, re-places and reports."""

from __future__ import annotations

import asyncio
import hashlib
import os

from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.core import catalog
from orchestrator.machines import load_machines
from orchestrator.ray_actors import RayNode

MACHINES = {hw.name: hw for hw in load_machines()}


def fake_sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class FakeCluster:
    """Nodes declared by hardware files; every replica loads unless its model is in `broken`.

    `holds` maps node -> file names it holds (default: every node holds every configured file);
    transfers started on a node stay in flight until `finish` or `fail`.
    """

    def __init__(self, names: list[str], broken: dict[str, str] | None = None,
                 holds: dict[str, set[str]] | None = None, unhashed: set[str] | None = None) -> None:
        self.alive = {name: True for name in names}
        self.broken = broken or {}
        self.holds = holds
        self.unhashed = unhashed or set()  # file names whose hash is not computed yet
        self.started: list[tuple[str, str, dict]] = []  # (node, replica id, settings)
        self.killed: list[str] = []
        self.crashed: set[str] = set()  # replica ids whose process died
        self.transfers: dict[str, tuple[str, dict, dict]] = {}  # id -> (node, spec, progress)
        self.cancelled: list[str] = []

    def list_nodes(self) -> list[RayNode]:
        return [RayNode(f"id-{n}", f"10.0.0.{i}", up, i == 0, n) for i, (n, up) in enumerate(self.alive.items())]

    def start_agent(self, node_id: str):
        return node_id.removeprefix("id-")

    def _files(self, node: str, model_paths: dict) -> set[str]:
        if self.holds is None:
            return {os.path.basename(p) for p in model_paths.values()}
        return set(self.holds.get(node, ()))

    async def report(self, agent: str, model_paths: dict, timeout_s: float) -> dict:
        if not self.alive[agent]:
            raise TimeoutError(agent)
        hardware = MACHINES[agent].model_copy(update={"source": "file"})
        held = self._files(agent, model_paths)
        files = [{"name": n, "path": f"/m/{agent}/{n}", "size_bytes": 4 << 30,
                  "sha256": None if n in self.unhashed else fake_sha(n)} for n in sorted(held)]
        configured = {m: f"/m/{agent}/{os.path.basename(p)}" for m, p in model_paths.items()
                      if os.path.basename(p) in held}
        return {"name": agent, "node_id": f"id-{agent}", "address": "10.0.0.1",
                "hardware": hardware.model_dump(mode="json"), "model_files": configured, "reported_at": 0.0,
                "store": {"models_dir": f"/m/{agent}", "disk_free_bytes": 100 << 30, "files": files,
                          "server_url": f"http://{agent}:9999"},
                "store_key": f"key-{agent}",
                "transfers": [p for n, _, p in self.transfers.values() if n == agent]}

    async def start_transfer(self, agent: str, spec: dict) -> dict:
        progress = {"transfer_id": spec["transfer_id"], "name": spec["name"], "state": "copying",
                    "source": spec["sources"][0]["label"], "kind": spec["sources"][0]["kind"]}
        self.transfers[spec["transfer_id"]] = (agent, spec, progress)
        return progress

    async def cancel_transfer(self, agent: str, transfer_id: str) -> bool:
        self.cancelled.append(transfer_id)
        return True

    def finish(self, transfer_id: str) -> None:
        node, spec, progress = self.transfers[transfer_id]
        progress.update(state="done", path=f"/m/{node}/{spec['name']}", sha256=spec["sha256"])
        if self.holds is not None:
            self.holds.setdefault(node, set()).add(spec["name"])

    def fail(self, transfer_id: str, error: str) -> None:
        self.transfers[transfer_id][2].update(state="failed", error=error)

    async def read_shape(self, agent, path: str):
        return catalog.lookup(os.path.basename(path).removesuffix(".gguf"))

    async def dry_run(self, agent, path, n_ctx, n_gpu_layers, kv_type, flash_attn, n_slots=1) -> dict:
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
    def is_node_gone_error(exc: BaseException) -> bool:
        return False

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


# ---------------------------------------------------------------- files travel to the chosen node


def only_the_desktop_holds(*names: str) -> FakeCluster:
    return FakeCluster(LAB, holds={"desktop": set(names)})


def test_node_placement_picks_without_the_file_gets_a_verified_copy_then_loads_it():
    cluster = only_the_desktop_holds("deepseek-r1-distill-qwen-7b.gguf")
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    run_ticks(controller)
    (transfer_id, (node, spec, _)), = cluster.transfers.items()
    assert node in ("laptop-1", "laptop-2")  # the rules still pick a laptop for a 7B
    assert controller.model_state("r1")[0] == "copying"
    assert spec["sha256"] == fake_sha("deepseek-r1-distill-qwen-7b.gguf")
    assert [s["label"] for s in spec["sources"]] == ["desktop"]
    assert spec["sources"][0]["headers"] == {"Authorization": "Bearer key-desktop"}
    assert not cluster.started  # nothing loads before the file is there
    cluster.finish(transfer_id)
    run_ticks(controller, 2)
    assert [(n, settings["path"]) for n, _, settings in cluster.started] == [
        (node, f"/m/{node}/deepseek-r1-distill-qwen-7b.gguf")]
    assert controller.model_state("r1")[0] == "ready"


def test_copy_waits_until_the_holder_has_hashed_its_file():
    cluster = FakeCluster(LAB, holds={"desktop": {"r1.gguf"}}, unhashed={"r1.gguf"})
    cluster_models = [{"name": "r1", "path": "r1.gguf", "catalog": "deepseek-r1-distill-qwen-7b"}]
    controller = Controller(config(cluster_models), cluster)
    controller.shapes["r1"] = catalog.lookup("deepseek-r1-distill-qwen-7b")
    run_ticks(controller)
    assert not cluster.transfers
    assert controller.model_state("r1") == ("pending", "waiting for desktop to compute the file's sha256")
    cluster.unhashed.clear()
    run_ticks(controller)
    assert len(cluster.transfers) == 1


def test_failed_copy_fails_the_model_with_its_reason_while_the_others_serve():
    cluster = only_the_desktop_holds("deepseek-r1-distill-qwen-7b.gguf", "qwen2.5-coder-14b.gguf")
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"},
                                    {"name": "coder", "path": "qwen2.5-coder-14b.gguf"}]), cluster)
    run_ticks(controller)
    (transfer_id,) = cluster.transfers
    cluster.fail(transfer_id, "disk full in /m after 1.0 GiB")
    run_ticks(controller, 2)
    state, reason = controller.model_state("r1")
    assert state == "failed" and "disk full" in reason and "copying deepseek" in reason
    assert controller.model_state("coder")[0] == "ready"


def test_model_no_node_holds_and_without_url_is_failed_with_the_reason():
    cluster = only_the_desktop_holds()
    controller = Controller(config([{"name": "r1", "path": "/models/r1.gguf"}]), cluster)
    run_ticks(controller)
    assert controller.model_state("r1") == (
        "failed", "file not found on any node: /models/r1.gguf (and the model has no `url` to download it from)")


def test_a_file_that_does_not_match_the_pinned_sha256_is_never_used():
    cluster = only_the_desktop_holds("r1.gguf")
    controller = Controller(config([{"name": "r1", "path": "r1.gguf", "sha256": "0" * 64}]), cluster)
    run_ticks(controller)
    state, reason = controller.model_state("r1")
    assert state == "failed" and "pinned sha256" in reason and "desktop: /m/desktop/r1.gguf has sha256" in reason
    assert not cluster.started and not cluster.transfers


def test_stopping_the_controller_cancels_copies_in_flight():
    cluster = only_the_desktop_holds("deepseek-r1-distill-qwen-7b.gguf")
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    run_ticks(controller)
    asyncio.run(controller.stop())
    assert cluster.cancelled == list(cluster.transfers)
