"""Models that load on demand, unload when idle and make room for each other: the
controller's residency logic against the fake cluster of test_controller (Ray replaced,
the logic real)."""

from __future__ import annotations

import time

import pytest

from orchestrator.controller import Controller
from tests.unit.test_controller import FakeCluster, config, run_ticks

SEVEN_B = "deepseek-r1-distill-qwen-7b.gguf"  # ~4.7 GB at Q4_K_M: one at a time on a 6 GB card


def on_demand(name: str, **extra) -> dict:
    return {"name": name, "path": SEVEN_B, "context": 4096, "parallel": 1, "load": "on_demand", **extra}


def states(controller: Controller) -> dict[str, str]:
    return {name: controller.model_state(name)[0] for name in controller.models}


def kinds(controller: Controller) -> list[tuple[str, str]]:
    return [(e["kind"], e["model"]) for e in controller.events if e["kind"] != "load_requested"]


def test_an_on_demand_model_is_not_loaded_until_it_is_asked_for():
    controller = Controller(config([on_demand("a"), {"name": "b", "path": SEVEN_B, "context": 4096}]),
                            FakeCluster(["desktop"]))
    run_ticks(controller)
    assert states(controller) == {"a": "not_loaded", "b": "ready"}
    assert controller.model_state("a")[1] == "loads on its first request"
    controller.request_load("a")
    run_ticks(controller)
    assert states(controller) == {"a": "ready", "b": "ready"}
    assert ("loaded", "a") in kinds(controller)


def test_a_model_that_finds_no_room_evicts_the_least_recently_used_idle_one():
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([on_demand("a"), on_demand("b"), on_demand("c")]), cluster)
    run_ticks(controller)
    controller.request_load("a")
    run_ticks(controller)
    assert next(r for r in controller.replicas.values()).assignment.kind == "gpu"
    controller.request_load("b")  # no room on the card: a (idle) goes
    run_ticks(controller)
    assert states(controller) == {"a": "not_loaded", "b": "ready", "c": "not_loaded"}
    evicted = [e for e in controller.events if e["kind"] == "evicted"]
    assert [e["model"] for e in evicted] == ["a"]
    assert "to make room for b" in evicted[0]["reason"] and "GiB" in evicted[0]["reason"]
    assert cluster.killed == ["a#0"]
    assert controller.model_state("a")[1] == evicted[0]["reason"]
    assert next(r for r in controller.replicas.values()).assignment.kind == "gpu"  # whole on the card again


def test_a_model_with_a_request_in_flight_is_never_evicted():
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([on_demand("a"), on_demand("b")]), cluster)
    run_ticks(controller)
    controller.request_load("a")
    run_ticks(controller)
    busy = next(r for r in controller.replicas.values() if r.model == "a")
    busy.in_flight = 1
    controller.request_load("b")
    run_ticks(controller)
    assert states(controller)["a"] == "ready" and not cluster.killed
    b = next(r for r in controller.replicas.values() if r.model == "b")
    assert b.assignment.kind != "gpu"  # it took what was left: a split or the CPU, not a's card
    assert not [e for e in controller.events if e["kind"] == "evicted"]


def test_load_always_models_and_pinned_keep_alive_are_never_evicted():
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([{"name": "a", "path": SEVEN_B, "context": 4096, "parallel": 1},
                                    on_demand("p", keep_alive=-1), on_demand("b")]), cluster)
    run_ticks(controller)
    controller.request_load("b")
    run_ticks(controller)
    assert not cluster.killed and states(controller)["a"] == "ready"


def test_an_idle_model_unloads_after_its_keep_alive_and_a_busy_one_stays():
    cluster = FakeCluster(["desktop"])
    controller = Controller(config([on_demand("a", keep_alive="50ms"), on_demand("b", keep_alive="50ms")]), cluster)
    run_ticks(controller)
    controller.request_load("a")
    controller.request_load("b")
    run_ticks(controller)
    assert states(controller) == {"a": "ready", "b": "ready"}
    next(r for r in controller.replicas.values() if r.model == "b").in_flight = 1
    time.sleep(0.1)
    run_ticks(controller)
    assert states(controller) == {"a": "not_loaded", "b": "ready"}
    reason = next(e for e in controller.events if e["kind"] == "idle_unload")["reason"]
    assert "keep_alive 0.05s" in reason or "keep_alive 50ms" in reason or "keep_alive" in reason
    assert controller.unloads_in_s("b") == pytest.approx(0.05)  # busy: its whole keep_alive is ahead


def test_a_request_keep_alive_overrides_the_config():
    controller = Controller(config([on_demand("a")]), FakeCluster(["desktop"]))
    assert controller.keep_alive_s("a") == 1800  # on-demand default: 30m
    controller.touch("a", "5m")
    assert controller.keep_alive_s("a") == 300
    controller.touch("a", -1)
    assert controller.keep_alive_s("a") is None and controller.unloads_in_s("a") is None


def test_a_model_that_fits_nowhere_even_with_room_made_is_reported_in_numbers():
    huge = {"name": "huge", "path": "deepseek-r1-distill-llama-70b.gguf", "context": 131072, "load": "on_demand"}
    controller = Controller(config([huge]), FakeCluster(["laptop-1"]))
    run_ticks(controller)
    controller.request_load("huge")
    controller.waiting["huge"] = 1  # a request waits for it
    run_ticks(controller)
    problem = controller._load_problem("huge")
    assert problem is not None and problem.status == 503 and "GiB" in problem.message
    del controller.waiting["huge"]  # it was answered 503: nobody wants the model any more
    run_ticks(controller)
    assert states(controller) == {"huge": "not_loaded"} and not controller.cannot_place


def test_unload_and_reload_change_what_is_loaded():
    import asyncio

    cluster = FakeCluster(["desktop"])
    controller = Controller(config([{"name": "a", "path": SEVEN_B, "context": 4096}, on_demand("b")]), cluster)
    run_ticks(controller)
    assert states(controller)["a"] == "ready"
    answer = asyncio.run(controller.unload_model("a"))
    assert answer == {"model": "a", "unloaded": ["a#0"]} and states(controller)["a"] == "not_loaded"
    summary = asyncio.run(controller.reload_config(config([
        {"name": "a", "path": SEVEN_B, "context": 8192},  # changed
        {"name": "c", "path": SEVEN_B, "context": 4096},  # added; b removed
    ])))
    assert summary == {"added": ["c"], "removed": ["b"], "changed": ["a"], "unchanged": []}
    run_ticks(controller)
    assert states(controller) == {"a": "ready", "c": "ready"}
    assert next(s for n, r, s in cluster.started if r == "a#0" and s["n_ctx"] == 8192)


def test_the_ledger_keeps_counting_a_ready_model_whose_weights_the_os_calls_available():
    controller = Controller(config([{"name": "a", "path": SEVEN_B, "context": 4096, "parallel": 1,
                                     "gpu_layers": 0}]), FakeCluster(["desktop"]))
    run_ticks(controller)
    replica = next(iter(controller.replicas.values()))
    node = next(iter(controller.nodes.values()))
    measured_free = controller._snapshots()[0].ram_free_bytes
    # A declared machine's figures never show the replica: all of its estimate is held.
    assert controller._ledger_snapshots()[0].ram_free_bytes == measured_free - replica.assignment.ram_bytes
    # A probed one shows its anonymous memory as used, its mapped weights as available: the rest is held.
    node.hardware = node.hardware.model_copy(update={"source": "probe"})
    replica.info["memory"] = {"rss_anon_bytes": 1 << 30, "rss_file_bytes": 4 << 30}
    held = replica.assignment.ram_bytes - (1 << 30)
    assert controller._ledger_snapshots()[0].ram_free_bytes == measured_free - held


def test_a_replica_that_keeps_crashing_backs_off_then_fails_and_the_others_keep_serving():
    from orchestrator.core.restarts import RestartPolicy

    cluster = FakeCluster(["desktop", "laptop-1"])
    cluster.alive["laptop-1"] = False  # asleep
    controller = Controller(config([{"name": "bad", "path": SEVEN_B, "context": 4096, "node": "desktop"},
                                    {"name": "good", "path": SEVEN_B, "context": 4096, "node": "desktop"}]),
                            cluster)
    controller.restart_policy = RestartPolicy(base_s=0.01, max_s=0.02, window_s=60, max_crashes=3, cool_down_s=60)
    run_ticks(controller)
    starts = []
    for _ in range(3):
        cluster.crashed.add("bad#0")
        run_ticks(controller, 1)  # the poll finds it dead
        cluster.crashed.discard("bad#0")
        starts.append(sum(1 for _, rid, _ in cluster.started if rid == "bad#0"))
        time.sleep(0.03)
        run_ticks(controller, 2)
    state, reason = controller.model_state("bad")
    assert state == "failed" and "crashed 3 times" in reason
    assert states(controller)["good"] == "ready"
    assert [e["kind"] for e in controller.events if e["model"] == "bad"].count("crashed") == 3
    cluster.alive["laptop-1"] = True  # a machine wakes: the failed replica is tried again
    run_ticks(controller, 3)
    assert controller.model_state("bad")[0] == "ready"


class RejoiningCluster(FakeCluster):
    """A machine that sleeps and wakes comes back as a new Ray node under its old name;
    Ray keeps listing the old one as dead."""

    def __init__(self, names):
        super().__init__(names)
        self.generation = {n: 0 for n in names}

    def list_nodes(self):
        from orchestrator.ray_actors import RayNode

        out = []
        for i, (name, up) in enumerate(self.alive.items()):
            for g in range(self.generation[name] + 1):
                current = g == self.generation[name]
                out.append(RayNode(f"id-{name}~{g}", f"10.0.0.{i}", up and current, i == 0, name))
        return out

    def start_agent(self, node_id: str):
        return node_id.removeprefix("id-").split("~")[0]

    def wake(self, name: str) -> None:
        self.generation[name] += 1
        self.alive[name] = True


def test_a_machine_that_comes_back_keeps_one_record_under_its_name():
    cluster = RejoiningCluster(["desktop", "laptop-1"])
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "node": "laptop-1"}]), cluster)
    run_ticks(controller)
    assert states(controller)["small"] == "ready"
    cluster.alive["laptop-1"] = False  # the lid closes
    run_ticks(controller, 2)
    assert [n.alive for n in controller.nodes.values() if n.name == "laptop-1"] == [False]
    assert states(controller)["small"] != "ready"
    cluster.wake("laptop-1")
    run_ticks(controller, 3)
    records = [n for n in controller.nodes.values() if n.name == "laptop-1"]
    assert len(records) == 1 and records[0].alive and records[0].node_id == "id-laptop-1~1"
    assert states(controller)["small"] == "ready"
    assert len(controller.view().nodes) == 2
    assert any(e["kind"] == "node_back" for e in controller.events)


def test_a_small_model_moves_back_to_its_laptop_make_before_break(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)
    cluster = RejoiningCluster(["desktop", "laptop-1"])
    cluster.alive["laptop-1"] = False  # asleep when the fleet starts
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "parallel": 1}]), cluster)
    run_ticks(controller)
    assert next(iter(controller.replicas.values())).node_name == "desktop"  # the only card awake
    served_by_old = next(iter(controller.replicas.values()))
    served_by_old.in_flight = 1  # a request is running on it while the move happens
    cluster.wake("laptop-1")
    run_ticks(controller, 4)
    now = controller.replicas[("small", 0)]
    assert now.node_name == "laptop-1" and now.state == "ready" and now.assignment.kind == "gpu"
    assert served_by_old.state == "unloading" and "small#0" not in cluster.killed  # its request finishes first
    served_by_old.in_flight = 0
    run_ticks(controller, 1)
    assert cluster.killed == ["small#0"]
    assert [e["kind"] for e in controller.events if e["kind"].startswith("mov")] == ["moving", "moved"]


def _woken_laptop_without_the_file(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)
    monkeypatch.setattr(orchestrator.rebalance, "FETCH_CHECK_S", 0.0)
    cluster = RejoiningCluster(["desktop", "laptop-1"])
    cluster.holds = {"desktop": {SEVEN_B}, "laptop-1": set()}
    cluster.alive["laptop-1"] = False
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "parallel": 1}]), cluster)
    run_ticks(controller)
    old = controller.replicas[("small", 0)]
    assert old.node_name == "desktop" and old.state == "ready"
    cluster.wake("laptop-1")
    run_ticks(controller, 4)
    return cluster, controller, old


def test_a_model_moves_back_to_a_laptop_that_lacks_its_file_after_a_copy(monkeypatch):
    cluster, controller, old = _woken_laptop_without_the_file(monkeypatch)
    [(transfer_id, (node, spec, _))] = cluster.transfers.items()
    assert node == "laptop-1" and spec["name"] == SEVEN_B and spec["sources"][0]["label"] == "desktop"
    assert controller.replicas[("small", 0)] is old and old.state == "ready"  # it serves while the file travels
    run_ticks(controller, 2)
    assert len(cluster.transfers) == 1  # one copy, not one a tick
    cluster.finish(transfer_id)
    run_ticks(controller, 4)
    now = controller.replicas[("small", 0)]
    assert now.node_name == "laptop-1" and now.state == "ready" and cluster.killed == ["small#0"]
    kinds = [e["kind"] for e in controller.events if e["kind"] in ("fetching_for_move", "copied", "moving", "moved")]
    assert kinds == ["fetching_for_move", "copied", "moving", "moved"]


def test_a_failed_copy_for_a_move_leaves_the_model_where_it_serves(monkeypatch):
    cluster, controller, old = _woken_laptop_without_the_file(monkeypatch)
    [transfer_id] = cluster.transfers
    cluster.fail(transfer_id, "disk full")
    run_ticks(controller, 4)
    assert controller.replicas[("small", 0)] is old and old.state == "ready" and not cluster.killed
    [event] = [e for e in controller.events if e["kind"] == "move_abandoned"]
    assert "disk full" in event["reason"] and event["node"] == "laptop-1"


def test_no_move_when_rebalance_is_off(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)
    cluster = RejoiningCluster(["desktop", "laptop-1"])
    cluster.alive["laptop-1"] = False
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "parallel": 1}],
                                   rebalance=False), cluster)
    run_ticks(controller)
    cluster.wake("laptop-1")
    run_ticks(controller, 4)
    assert controller.replicas[("small", 0)].node_name == "desktop" and not cluster.killed


class CountingCluster(FakeCluster):
    """Replicas report how many requests they hold (worker/replica.py `requests_in_progress`)."""

    holding = 0

    async def info(self, handle: str, timeout_s: float) -> dict:
        return {**await super().info(handle, timeout_s), "requests_in_progress": self.holding}


def test_a_slot_a_lost_path_never_released_is_given_back_and_its_late_release_changes_nothing():
    from orchestrator.gateway.relay import Flight
    from orchestrator.gateway.router import Router

    cluster = CountingCluster(["desktop"])
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "parallel": 1}]), cluster)
    run_ticks(controller)
    router = Router(controller, queue_per_replica=0)
    replica = router.acquire("small")
    lost = Flight(router, replica, "lost-one")  # e.g. a path that forgot to end it
    run_ticks(controller, 1)
    assert replica.in_flight == 1  # recent: it may still be on its way to the replica
    replica.flights_changed_at -= 60.0
    cluster.holding = 1
    run_ticks(controller, 1)
    assert replica.in_flight == 1  # the replica holds a request: the count is explained
    cluster.holding = 0
    run_ticks(controller, 1)
    assert replica.in_flight == 0 and router.acquire("small") is replica  # the slot serves again
    assert [e["kind"] for e in controller.events].count("reconciled") == 1
    lost.end(served=False, cancel=False)  # the old flight ends at last: the new one keeps its count
    assert replica.in_flight == 1


def test_a_slot_leaked_on_a_replica_that_moved_away_is_given_back_so_it_stops(monkeypatch):
    import orchestrator.rebalance

    monkeypatch.setattr(orchestrator.rebalance, "REBALANCE_SETTLE_S", 0.0)

    class Cluster(RejoiningCluster, CountingCluster):
        pass

    cluster = Cluster(["desktop", "laptop-1"])
    cluster.alive["laptop-1"] = False
    controller = Controller(config([{"name": "small", "path": SEVEN_B, "context": 4096, "parallel": 1}]), cluster)
    run_ticks(controller)
    old = controller.replicas[("small", 0)]
    old.in_flight = 1  # a slot some path never released
    cluster.wake("laptop-1")
    run_ticks(controller, 4)
    assert controller.replicas[("small", 0)].node_name == "laptop-1" and old in controller.retiring
    old.flights_changed_at -= 60.0
    run_ticks(controller, 2)
    assert old.in_flight == 0 and cluster.killed == ["small#0"] and not controller.retiring
