"""Splits across machines run by the control loop (issue 13) against the fake cluster of
test_controller: the RPC servers start on the helpers before the replica loads and stop
when it ends; a server that cannot start means no split, with the reason; a helper that
leaves means the model is placed again without it."""

from __future__ import annotations

import asyncio
import time

from orchestrator.controller import Controller
from tests.unit.test_controller import LAB, FakeCluster, config, run_ticks

CODER_32B = "qwen2.5-coder-32b.gguf"  # 19.8 GB of weights: no card holds it whole


def coder(**cluster) -> tuple[FakeCluster, Controller]:
    fake = FakeCluster(LAB)
    return fake, Controller(config([{"name": "coder", "path": CODER_32B, "context": 4096, "parallel": 1}],
                                   **cluster), fake)


def test_the_32b_is_split_across_the_desktop_and_a_laptop_and_its_servers_start_first():
    fake, controller = coder()
    run_ticks(controller, 4)
    replica = controller.replicas[("coder", 0)]
    a = replica.assignment
    assert replica.state == "ready" and a.kind == "rpc" and a.node == "desktop"
    (node, replica_id, settings) = fake.started[-1]
    helpers = [h.node for h in a.helpers]
    assert node == "desktop" and helpers and set(helpers) <= {"laptop-1", "laptop-2"}
    assert settings["rpc_servers"] == tuple(f"10.0.0.{LAB.index(h)}:{50052}" for h in helpers)
    assert settings["rpc_layers"] == tuple(h.layers for h in a.helpers)
    assert settings["n_gpu_layers"] == a.n_layers
    assert {(n, p) for (n, p) in fake.rpc_running} == {(h, 50052) for h in helpers}
    (view,) = controller.view().models[0].replicas
    assert view.processor == a.describe() and view.processor.startswith("desktop ") and "(RPC)" in view.processor
    assert "taken" in view.split_why and view.predicted_tokens_per_s
    from orchestrator.status_report import render_status

    status = render_status(controller.view())
    assert a.describe() in status and "coder (RPC helper)" in status
    assert f"split: {a.split_why}" in status  # both speeds and the verdict
    events = [e for e in controller.events.since() if e["kind"] == "placed"]
    assert "across machines" in events[-1]["reason"]


def test_the_helpers_servers_stop_when_the_split_ends():
    fake, controller = coder()
    run_ticks(controller, 4)
    helpers = {(h.node, 50052) for h in controller.replicas[("coder", 0)].assignment.helpers}
    asyncio.run(controller.unload_model("coder"))
    run_ticks(controller, 3)
    assert ("coder", 0) not in controller.replicas
    assert set(fake.rpc_stopped) == helpers and not fake.rpc_running


def test_a_server_that_cannot_start_means_no_split_with_the_reason():
    fake, controller = coder()
    fake.rpc_broken = {"laptop-1": "port 50052 is taken", "laptop-2": "port 50052 is taken"}
    run_ticks(controller, 6)
    replica = controller.replicas[("coder", 0)]
    assert replica.assignment.kind == "split" and replica.assignment.node == "desktop"  # GPU/CPU on the desktop
    assert "port 50052 is taken" in replica.assignment.split_why
    from orchestrator.status_report import render_status

    assert "split: split not used: laptop-" in render_status(controller.view())
    assert any(e["kind"] == "split_refused" and "port 50052 is taken" in e["reason"] for e in controller.events.since())
    assert not fake.rpc_running


def test_a_helper_that_leaves_means_the_model_is_placed_again_without_it():
    fake, controller = coder()
    run_ticks(controller, 4)
    first = controller.replicas[("coder", 0)]
    (helper,) = [h.node for h in first.assignment.helpers]
    fake.alive[helper] = False
    run_ticks(controller, 4)
    assert first.handle in fake.killed
    again = controller.replicas[("coder", 0)]
    assert again is not first and helper not in again.assignment.nodes and again.state == "ready"


def test_a_split_replicas_measured_speed_calibrates_the_next_prediction():
    fake = FakeCluster(LAB, probed=set(LAB), decode_rates={"coder": 3.0})
    controller = Controller(config([{"name": "coder", "path": CODER_32B, "context": 4096, "parallel": 1}]), fake)
    run_ticks(controller, 5)
    a = controller.replicas[("coder", 0)].assignment
    assert a.kind == "rpc"
    from orchestrator.core.rpc_split import split_key

    factor = controller.split_speed_factors[split_key(a.nodes)]
    assert abs(factor - 3.0 / a.tokens_per_s) < 1e-3
    run_ticks(controller, 2)  # measured again: the factor does not compound
    assert abs(controller.split_speed_factors[split_key(a.nodes)] - factor) < 1e-3


def test_splits_can_be_turned_off():
    fake, controller = coder(rpc_split=False)
    run_ticks(controller, 4)
    assert controller.replicas[("coder", 0)].assignment.kind == "split" and not fake.rpc_running


def test_each_nodes_round_trip_is_measured_and_prices_its_hops():
    fake, controller = coder()
    run_ticks(controller, 4)
    hardware = {n.name: n.hardware for n in controller.view().nodes}
    assert all(h.link_rtt_ms == 0.25 for h in hardware.values())  # the fake's LAN; no file declares one


def test_draining_a_helper_ends_its_part_in_the_split_and_the_model_runs_without_it():
    fake, controller = coder()
    run_ticks(controller, 4)
    first = controller.replicas[("coder", 0)]
    (helper,) = [h.node for h in first.assignment.helpers]
    drain = _drain(controller, helper)
    assert drain["state"] == "drained"
    assert [s["replica"] for s in drain["stopped"]] + [m["replica"] for m in drain["moved"]] == ["coder#0"]
    run_ticks(controller, 4)
    again = controller.replicas[("coder", 0)]
    assert again is not first and helper not in again.assignment.nodes
    assert (helper, 50052) not in fake.rpc_running  # its server stopped with the replica


def _drain(controller: Controller, node: str) -> dict:
    async def scenario():
        task = asyncio.create_task(controller.drain_node(node, timeout_s=30))
        for _ in range(6):
            await controller.tick()
            await asyncio.sleep(0)
            if task.done():
                break
        return await asyncio.wait_for(task, 5)

    return asyncio.run(scenario())


def test_a_helpers_gpu_is_booked_for_its_part_of_the_split():
    fake = FakeCluster(LAB)
    controller = Controller(config([
        {"name": "coder", "path": CODER_32B, "context": 4096, "parallel": 1},
        {"name": "b", "path": "deepseek-r1-distill-qwen-7b.gguf", "context": 4096, "parallel": 1, "load": "on_demand"},
    ]), fake)
    run_ticks(controller, 4)
    (helper,) = controller.replicas[("coder", 0)].assignment.helpers
    controller.request_load("b")
    run_ticks(controller, 4)
    b = controller.replicas[("b", 0)].assignment
    assert b.kind == "gpu" and b.node != helper.node  # the helper's card is taken: the other laptop's is not


def test_an_rpc_server_no_replica_uses_is_stopped():
    fake, controller = coder()
    run_ticks(controller, 4)
    fake.rpc_running[("laptop-2", 50099)] = 0  # a start that timed out at the head but went on there
    run_ticks(controller, 2)
    assert ("laptop-2", 50099) in fake.rpc_stopped and ("laptop-2", 50099) not in fake.rpc_running
    assert controller.replicas[("coder", 0)].state == "ready"


def test_unloading_idle_models_never_turns_a_split_across_machines_into_a_slower_one():
    fake = FakeCluster(LAB)
    controller = Controller(config([
        {"name": "tiny", "path": "gemma-3-270m.gguf", "context": 4096, "parallel": 1, "node": "desktop",
         "load": "on_demand", "keep_alive": "1h"},
        {"name": "coder", "path": CODER_32B, "context": 4096, "parallel": 1, "load": "on_demand"},
    ]), fake)
    controller.request_load("tiny")
    run_ticks(controller, 4)
    controller.last_used["tiny"] = time.monotonic() - 100  # idle: evictable
    controller.request_load("coder")
    run_ticks(controller, 4)
    assert controller.replicas[("coder", 0)].assignment.kind == "rpc"
    assert controller.model_state("tiny")[0] == "ready"  # not evicted for a worse placement


def test_an_idle_model_goes_back_to_its_split_when_the_helper_comes_back(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)
    fake, controller = coder()
    fake.alive["laptop-1"] = fake.alive["laptop-2"] = False  # asleep: the desktop alone
    run_ticks(controller, 4)
    assert controller.replicas[("coder", 0)].assignment.kind == "split"
    fake.alive["laptop-1"] = True  # a laptop wakes
    run_ticks(controller, 6)
    back = controller.replicas[("coder", 0)]
    assert back.assignment.kind == "rpc" and back.assignment.helpers[0].node == "laptop-1"
    assert any(e["kind"] == "moving" and "is idle" in e["reason"] for e in controller.events.since())


def test_a_busy_model_is_not_restarted_into_a_split(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)
    fake, controller = coder()
    fake.alive["laptop-1"] = fake.alive["laptop-2"] = False
    run_ticks(controller, 4)
    single = controller.replicas[("coder", 0)]
    single.in_flight = 1  # a request is running
    fake.alive["laptop-1"] = True
    run_ticks(controller, 6)
    assert controller.replicas[("coder", 0)] is single and single.state == "ready"


def test_a_helper_that_stopped_answering_takes_part_again_once_it_rejoins():
    fake, controller = coder()
    run_ticks(controller, 4)
    controller.helpers_lost["laptop-1"] = time.monotonic() + 3600  # it stopped answering mid-split
    fake.alive["laptop-1"] = False
    run_ticks(controller, 2)
    assert "laptop-1" in controller.helpers_lost
    fake.alive["laptop-1"] = True  # back
    run_ticks(controller, 2)
    assert "laptop-1" not in controller.helpers_lost
