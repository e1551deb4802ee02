"""The control loop against a fake cluster (the Ray shell replaced, the logic real): nodes
come and go, replicas load or fail, and the controller places, re-places and reports."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from orchestrator.config import parse_config
from orchestrator.controller import Controller
from orchestrator.core import catalog
from orchestrator.core.hardware import MIB
from orchestrator.fit import GPU_DECODE_EFFICIENCY
from orchestrator.machines import load_machines
from orchestrator.ray_actors import RayNode

MACHINES = {hw.name: hw for hw in load_machines()}
SEVEN_B = "deepseek-r1-distill-qwen-7b.gguf"  # ~5 GB whole on a GPU at 4096 tokens


def fake_sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class FakeCluster:
    """Nodes declared by hardware files; every replica loads unless its model is in `broken`.

    `holds` maps node -> file names it holds (default: every node holds every configured file);
    transfers started on a node stay in flight until `finish` or `fail`. A node in `probed`
    reports its hardware as probed rather than declared; a model in `decode_rates` reports
    that decode speed (tokens/s) once ready.
    """

    def __init__(self, names: list[str], broken: dict[str, str] | None = None,
                 holds: dict[str, set[str]] | None = None, unhashed: set[str] | None = None,
                 probed: set[str] | None = None, decode_rates: dict[str, float] | None = None) -> None:
        self.alive = {name: True for name in names}
        self.probed = probed or set()
        self.decode_rates = decode_rates or {}
        self.broken = broken or {}
        self.holds = holds
        self.unhashed = unhashed or set()  # file names whose hash is not computed yet
        self.started: list[tuple[str, str, dict]] = []  # (node, replica id, settings)
        self.killed: list[str] = []
        self.crashed: set[str] = set()  # replica ids whose process died
        self.transfers: dict[str, tuple[str, dict, dict]] = {}  # id -> (node, spec, progress)
        self.cancelled: list[str] = []
        self.drain_asks: list = []  # DrainRequests `join` left in Ray's KV
        self.drain_answers: list[tuple[object, dict]] = []
        self.rpc_running: dict[tuple[str, int], int | None] = {}  # (node, port) -> GPU of its RPC server
        self.rpc_stopped: list[tuple[str, int]] = []
        self.rpc_broken: dict[str, str] = {}  # node -> why its RPC server cannot start

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
        hardware = MACHINES[agent].model_copy(update={"source": "probe" if agent in self.probed else "file"})
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
                "transfers": [p for n, _, p in self.transfers.values() if n == agent],
                "rpc_servers": [{"port": port, "endpoint": f"10.0.0.1:{port}", "gpu_index": gpu, "alive": True}
                                for (node, port), gpu in sorted(self.rpc_running.items()) if node == agent]}

    async def start_rpc_server(self, agent: str, port: int, gpu_index: int | None) -> dict:
        if agent in self.rpc_broken:
            return {"error": self.rpc_broken[agent]}
        self.rpc_running[(agent, port)] = gpu_index
        return {"endpoint": f"10.0.0.1:{port}"}

    @staticmethod
    def round_trip_ms(host: str, port: int) -> float | None:
        return 0.25  # a wired home LAN

    async def stop_rpc_server(self, agent: str, port: int) -> bool:
        self.rpc_stopped.append((agent, port))
        return self.rpc_running.pop((agent, port), "none") != "none"

    async def start_transfer(self, agent: str, spec: dict) -> dict:
        progress = {"transfer_id": spec["transfer_id"], "name": spec["name"], "state": "copying",
                    "source": spec["sources"][0]["label"], "kind": spec["sources"][0]["kind"]}
        self.transfers[spec["transfer_id"]] = (agent, spec, progress)
        return progress

    async def transfer(self, agent: str, transfer_id: str) -> dict | None:
        node, _, progress = self.transfers.get(transfer_id, (None, None, None))
        return progress if node == agent else None

    async def cancel_transfer(self, agent: str, transfer_id: str) -> bool:
        self.cancelled.append(transfer_id)
        return True

    async def remove_copy(self, agent: str, name: str) -> dict:
        held = self.holds.get(agent, set()) if self.holds is not None else set()
        if name not in held:
            return {"name": name, "error": f"{agent} holds no copy named {name}"}
        held.discard(name)
        return {"name": name, "freed_bytes": 4 << 30}

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

    async def load(self, handle: str, timeout_s: float) -> dict:
        model = handle.split("#")[0]
        if model in self.broken:
            return {"state": "failed", "reason": self.broken[model]}
        return {"state": "ready", "memory": {"rss_bytes": 1 << 30, "vram_bytes": None}}

    async def info(self, handle: str, timeout_s: float) -> dict:
        if handle in self.crashed:
            raise ConnectionError(handle)  # stands for Ray's "actor died"
        return {"state": "ready", "decode_tokens_per_s": self.decode_rates.get(handle.split("#")[0])}

    def kill(self, handle) -> None:
        self.killed.append(handle)

    def drain_requests(self) -> list:
        return list(self.drain_asks)

    def answer_drain(self, request, answer: dict) -> None:
        self.drain_answers.append((request, answer))
        self.drain_asks = [r for r in self.drain_asks if r.node != request.node]

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


def usable_vram_bytes(node: str) -> int:
    """Room on a node's card as the placement rules count it: its free VRAM (a hardware file
    declares no use: all of it) less a margin of max(256 MiB, 5% of the card)."""
    gpu = MACHINES[node].gpus[0]
    return gpu.vram_free - max(256 * MIB, int(gpu.vram_total_bytes) // 20)


def test_declared_gpu_memory_of_running_replicas_stays_reserved_across_ticks():
    # A declared card's free figure never drops, so only the controller's own ledger keeps a
    # running replica's VRAM: b is placed ticks after a, when the card still reads as empty.
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([
        {"name": "a", "path": SEVEN_B, "context": 4096, "parallel": 1},
        {"name": "b", "path": SEVEN_B, "context": 4096, "parallel": 1, "load": "on_demand"},
    ]), cluster)
    run_ticks(controller, 3)
    first = controller.replicas[("a", 0)].assignment
    assert first.kind == "gpu" and first.node == "laptop-1"
    assert 2 * first.gpu_bytes > usable_vram_bytes("laptop-1")  # the 6 GB card cannot hold both whole
    controller.request_load("b")
    run_ticks(controller, 5)
    second = controller.replicas[("b", 0)].assignment
    assert [replica_id for _, replica_id, _ in cluster.started] == ["a#0", "b#0"]
    assert controller.replicas[("a", 0)].assignment == first  # a keeps its place on the card
    assert second.kind != "gpu"
    on_the_card = sum(x.gpu_bytes for x in (first, second) if (x.node, x.gpu_index) == ("laptop-1", 0))
    assert on_the_card <= usable_vram_bytes("laptop-1")


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


def test_probed_node_speed_factor_is_measured_over_predicted_decode_speed():
    # Whole on the card, each decoded token reads every offloaded weight once from VRAM at
    # GPU_DECODE_EFFICIENCY of its bandwidth; the replica measures 60% of that.
    shape = catalog.lookup("deepseek-r1-distill-qwen-7b")
    gpu = MACHINES["laptop-1"].gpus[0]
    bytes_per_token = sum(shape.layer_weight_bytes) + shape.output_bytes
    predicted = gpu.memory_bandwidth_gbps * 1e9 * GPU_DECODE_EFFICIENCY / bytes_per_token
    measured = round(0.6 * predicted, 2)
    cluster = FakeCluster(["laptop-1"], probed={"laptop-1"}, decode_rates={"r1": measured})
    controller = Controller(config([{"name": "r1", "path": SEVEN_B, "context": 4096, "parallel": 1}]), cluster)
    run_ticks(controller, 4)
    assert controller.replicas[("r1", 0)].assignment.kind == "gpu"
    (node,) = controller.view().nodes
    assert node.speed_factor == pytest.approx(measured / predicted, abs=1e-3)
    assert node.speed_factor == pytest.approx(0.6, abs=1e-3)


def test_replica_whose_process_died_is_forgotten_and_started_again():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    run_ticks(controller)
    cluster.crashed.add("r1#0")
    run_ticks(controller, 1)
    assert "r1#0" in cluster.killed
    cluster.crashed.clear()
    state, reason = controller.model_state("r1")
    assert state == "pending" and "starting again in 1 s" in reason  # a backoff, not a restart each tick
    time.sleep(1.05)
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


def test_a_copy_that_finishes_between_reports_loads_at_once():
    """The controller asks the node after its copy (copy_flow._watch_transfer): the replica
    starts when the file is verified, with no tick and so no report in between."""
    cluster = only_the_desktop_holds("deepseek-r1-distill-qwen-7b.gguf")
    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), cluster)
    controller.transfer_poll_s = 0.01

    async def scenario():
        for _ in range(3):
            await controller.tick()
            await asyncio.sleep(0)
        (transfer_id,) = cluster.transfers
        assert controller.model_state("r1")[0] == "copying" and not cluster.started
        ticks = controller.ticks
        cluster.finish(transfer_id)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if cluster.started:
                break
        assert controller.ticks == ticks  # no report came meanwhile
        assert [rid for _, rid, _ in cluster.started] == ["r1#0"]
        assert [e["kind"] for e in controller.events if e["kind"] == "copied"] == ["copied"]
        await controller.stop()

    asyncio.run(scenario())


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
