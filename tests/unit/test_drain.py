"""Draining a node against the fake cluster of test_controller (Ray replaced, the logic real):
its models start elsewhere first (make-before-break), its requests finish (bounded), nothing
new goes there; the admin route and the CLI that speak it; join's request through Ray's KV."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from orchestrator.cli import build_parser
from orchestrator.controller import Controller
from orchestrator.drain_channel import DrainRequest, decode_answer, describe_drain, encode_answer
from orchestrator.gateway.api_key import is_admin_operation
from orchestrator.gateway.app import create_app
from orchestrator.membership import HeadUnreachable, NodeKeeper
from tests.unit.test_controller import LAB, SEVEN_B, FakeCluster, config
from tests.unit.test_gateway_fakes import LAN_PEER, asgi_client
from tests.unit.test_residency import RejoiningCluster


async def ticks(controller: Controller, n: int = 3) -> None:
    for _ in range(n):
        await controller.tick()
        for _ in range(3):
            await asyncio.sleep(0)  # the load and move tasks


def small(name: str = "small", **extra) -> dict:
    return {"name": name, "path": SEVEN_B, "context": 4096, "parallel": 1, **extra}


def replica_on(controller: Controller, model: str):
    return controller.replicas[(model, 0)]


def test_a_drained_nodes_replica_starts_elsewhere_first_and_its_request_in_flight_finishes():
    cluster = FakeCluster(LAB)
    controller = Controller(config([small()]), cluster)

    async def scenario():
        await ticks(controller)
        old = replica_on(controller, "small")
        drained = old.node_name
        assert drained in ("laptop-1", "laptop-2")  # the smallest card that holds it
        old.in_flight = 1  # a request runs on it during the drain
        drain = asyncio.create_task(controller.drain_node(drained, timeout_s=30))
        await ticks(controller, 2)
        new = replica_on(controller, "small")
        assert new is not old and new.node_name != drained and new.state == "ready"  # routing switched
        assert old.state == "unloading" and "small#0" not in cluster.killed  # its request goes on
        assert not drain.done()
        old.in_flight = 0
        await ticks(controller, 1)
        answer = await asyncio.wait_for(drain, 1)
        return drained, new, answer

    drained, new, answer = asyncio.run(scenario())
    assert answer["state"] == "drained" and not answer["timed_out"] and answer["cut_requests"] == 0
    assert answer["moved"] == [{"replica": "small#0", "model": "small", "to": new.node_name, "kind": "gpu"}]
    assert answer["stopped"] == []
    assert cluster.killed == ["small#0"]  # the old one, once its request ended; the new one serves
    assert [n for n, rid, _ in cluster.started] == [drained, new.node_name]
    kinds = [e["kind"] for e in controller.events]
    assert kinds.index("draining") < kinds.index("moving") < kinds.index("moved") < kinds.index("drained")
    assert "small#0 moved to" in describe_drain(answer)


def test_nothing_new_is_placed_on_a_draining_node_until_it_is_undrained():
    cluster = FakeCluster(["laptop-1", "laptop-2"])
    controller = Controller(config([small("a", node="laptop-1"), small("b", load="on_demand")]), cluster)

    async def scenario():
        await ticks(controller)
        answer = await asyncio.wait_for(_drained(controller, "laptop-2"), 5)
        assert answer["moved"] == [] and answer["stopped"] == []
        assert "laptop-2" not in {s.name for s in controller._snapshots()}
        assert {n.name: n.state for n in controller.view().nodes}["laptop-2"] == "draining"
        controller.request_load("b")
        await ticks(controller)
        assert replica_on(controller, "b").node_name == "laptop-1"  # beside a, though laptop-2 is empty
        assert await controller.undrain_node("laptop-2") == {"node": "laptop-2", "draining": False,
                                                             "was_draining": True}
        assert {n.name: n.state for n in controller.view().nodes}["laptop-2"] == "alive"
        assert "laptop-2" in {s.name for s in controller._snapshots()}

    asyncio.run(scenario())


async def _drained(controller: Controller, node: str, timeout_s: float = 30) -> dict:
    drain = asyncio.create_task(controller.drain_node(node, timeout_s))
    while not drain.done():
        await ticks(controller, 1)
    return drain.result()


def test_a_replica_that_fits_nowhere_else_stops_after_its_requests_and_its_model_waits():
    cluster = FakeCluster(LAB)
    controller = Controller(config([small("pinned", node="laptop-1")]), cluster)

    async def scenario():
        await ticks(controller)
        old = replica_on(controller, "pinned")
        old.in_flight = 1
        drain = asyncio.create_task(controller.drain_node("laptop-1", timeout_s=30))
        await ticks(controller, 2)
        assert old.state == "unloading" and not controller.ready_replicas("pinned")  # no new work for it
        assert "pinned#0" not in cluster.killed  # its request finishes first
        old.in_flight = 0
        await ticks(controller, 2)
        return await asyncio.wait_for(drain, 1)

    answer = asyncio.run(scenario())
    assert answer["moved"] == [] and [s["replica"] for s in answer["stopped"]] == ["pinned#0"]
    assert "pinned" in answer["stopped"][0]["reason"]  # placement's own words: pinned to laptop-1
    assert cluster.killed == ["pinned#0"]
    assert controller.model_state("pinned")[0] == "pending"


def test_the_drain_timeout_stops_what_is_left_and_counts_the_requests_cut():
    cluster = FakeCluster(LAB)
    controller = Controller(config([small("pinned", node="laptop-1")]), cluster)

    async def scenario():
        await ticks(controller)
        replica_on(controller, "pinned").in_flight = 2  # never ends by itself
        drain = asyncio.create_task(controller.drain_node("laptop-1", timeout_s=0.05))
        await ticks(controller, 1)
        assert not drain.done()
        await asyncio.sleep(0.1)
        await ticks(controller, 1)
        return await asyncio.wait_for(drain, 1)

    answer = asyncio.run(scenario())
    assert answer["timed_out"] and answer["cut_requests"] == 2
    assert cluster.killed == ["pinned#0"]
    assert "(timed out)" in describe_drain(answer) and "2 request(s)" in describe_drain(answer)


class SlowLoads(FakeCluster):
    """Loads started while `held` is set wait until it is cleared (a move that takes a while);
    `ram_gib` declares less RAM available on some nodes."""

    def __init__(self, names: list[str], ram_gib: dict[str, float] | None = None) -> None:
        super().__init__(names)
        self.held: asyncio.Event | None = None
        self.ram_gib = ram_gib or {}

    async def report(self, agent: str, model_paths: dict, timeout_s: float) -> dict:
        report = await super().report(agent, model_paths, timeout_s)
        if agent in self.ram_gib:
            report["hardware"]["ram_available_bytes"] = int(self.ram_gib[agent] * (1 << 30))
        return report

    async def load(self, handle: str, timeout_s: float) -> dict:
        gate = self.held
        if gate is not None:
            await gate.wait()
        return await super().load(handle, timeout_s)


def test_idle_models_elsewhere_are_not_evicted_for_a_replica_the_drain_is_moving():
    """laptop-2's card holds the idle on-demand b: a moves there beside it (on the CPU, which
    has room for one copy), and while that move loads, placement does not evict b to get a
    whole card for a replica it sees as unplaced."""
    cluster = SlowLoads(["laptop-1", "laptop-2"], ram_gib={"laptop-2": 12})
    controller = Controller(config([small("a"), small("b", load="on_demand", node="laptop-2")]), cluster)

    async def scenario():
        await ticks(controller)
        controller.request_load("b")
        await ticks(controller)
        assert replica_on(controller, "a").node_name == "laptop-1"
        assert replica_on(controller, "b").node_name == "laptop-2"
        cluster.held = asyncio.Event()
        drain = asyncio.create_task(controller.drain_node("laptop-1", 30))
        await ticks(controller, 3)  # the move loads meanwhile
        assert ("a", 0) in controller.moves and not drain.done()
        cluster.held.set()
        cluster.held = None
        while not drain.done():
            await ticks(controller, 1)
        return drain.result()

    answer = asyncio.run(scenario())
    assert [(m["replica"], m["to"]) for m in answer["moved"]] == [("a#0", "laptop-2")]
    assert answer["moved"][0]["kind"] != "gpu"
    assert not [e for e in controller.events if e["kind"] == "evicted"]
    assert controller.model_state("b")[0] == "ready"


def test_draining_an_unknown_node_is_404_and_a_gone_one_409():
    from worker.errors import RequestError

    cluster = FakeCluster(LAB)
    controller = Controller(config([small()]), cluster)

    async def scenario():
        await ticks(controller)
        cluster.alive["laptop-2"] = False
        await ticks(controller, 1)
        with pytest.raises(RequestError) as unknown:
            await controller.drain_node("nope")
        with pytest.raises(RequestError) as gone:
            await controller.drain_node("laptop-2")
        with pytest.raises(RequestError) as undrain:
            await controller.undrain_node("nope")
        return unknown.value, gone.value, undrain.value

    unknown, gone, undrain = asyncio.run(scenario())
    assert (unknown.status, unknown.code) == (404, "node_not_found") and "desktop" in unknown.message
    assert (gone.status, gone.code) == (409, "node_gone")
    assert undrain.status == 404


def test_a_drained_machine_back_as_a_new_node_takes_work_again():
    cluster = RejoiningCluster(["desktop", "laptop-1"])
    controller = Controller(config([small()]), cluster)

    async def scenario():
        await ticks(controller)
        await asyncio.wait_for(_drained(controller, "laptop-1"), 5)
        cluster.alive["laptop-1"] = False  # join stopped the node
        await ticks(controller, 2)
        cluster.wake("laptop-1")  # and started it again
        await ticks(controller, 2)

    asyncio.run(scenario())
    record = next(n for n in controller.nodes.values() if n.name == "laptop-1")
    assert record.alive and not record.draining
    assert [e["kind"] for e in controller.events if e["node"] == "laptop-1"][-1] != "draining"
    assert any(e["kind"] == "undrained" for e in controller.events)


# ----------------------------------------------------------------------------- the admin route and CLI


def test_the_drain_route_answers_the_summary_and_404_for_an_unknown_node():
    cluster = FakeCluster(LAB)
    controller = Controller(config([small()]), cluster)

    async def scenario():
        await ticks(controller)
        app = create_app(controller, controller.config)
        drained = replica_on(controller, "small").node_name

        async def keep_ticking():
            while True:
                await ticks(controller, 1)
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(keep_ticking())
        try:
            async with asgi_client(app) as client:
                ok = await client.post(f"/api/nodes/{drained}/drain", json={"timeout_s": 5})
                missing = await client.post("/api/nodes/nope/drain")
                back = await client.post(f"/api/nodes/{drained}/undrain")
            async with asgi_client(app, LAN_PEER) as client:
                refused = await client.post(f"/api/nodes/{drained}/drain")
        finally:
            ticker.cancel()
        return drained, ok, missing, back, refused

    drained, ok, missing, back, refused = asyncio.run(scenario())
    assert ok.status_code == 200, ok.text
    assert ok.json()["state"] == "drained" and ok.json()["moved"][0]["replica"] == "small#0"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "node_not_found"
    assert back.json() == {"node": drained, "draining": False, "was_draining": True}
    assert refused.status_code == 403  # an admin operation: no admin key set, so loopback only


@pytest.mark.parametrize("path", ["/api/nodes/laptop-1/drain", "/api/nodes/laptop-1/undrain"])
def test_drain_and_undrain_are_admin_operations(path):
    assert is_admin_operation("POST", path)
    assert not is_admin_operation("GET", path)


def test_homefleet_drain_posts_the_timeout_and_prints_what_moved(capsys):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content or b"null")))
        return httpx.Response(200, json={"node": "laptop-1", "state": "drained", "seconds": 2.5, "timed_out": False,
                                         "moved": [{"replica": "small#0", "model": "small", "to": "desktop",
                                                    "kind": "gpu"}],
                                         "stopped": [{"replica": "big#0", "model": "big",
                                                      "reason": "no other node has room"}], "cut_requests": 0})

    args = build_parser().parse_args(["drain", "laptop-1", "--timeout", "30", "--url", "http://head:8000"])
    assert args.func(args, transport=httpx.MockTransport(handler)) == 0
    assert seen == [("/api/nodes/laptop-1/drain", {"timeout_s": 30.0})]
    assert capsys.readouterr().out.strip() == (
        "laptop-1 drained in 2.5 s: small#0 moved to desktop; big#0 stopped (no other node has room)")


# ----------------------------------------------------------------------------- join, through Ray's KV


def test_joins_request_through_ray_kv_drains_the_node_and_is_answered():
    cluster = FakeCluster(LAB)
    controller = Controller(config([small()]), cluster)

    async def scenario():
        await ticks(controller)
        node = replica_on(controller, "small").node_name
        cluster.drain_asks = [DrainRequest(node, "req-1", 30.0), DrainRequest("nope", "req-2", 30.0)]
        for _ in range(6):
            await ticks(controller, 1)
            await asyncio.sleep(0.01)  # the answers go through a thread
        return node

    node = asyncio.run(scenario())
    answers = {request.request_id: answer for request, answer in cluster.drain_answers}
    assert answers["req-1"]["node"] == node and answers["req-1"]["state"] == "drained"
    assert answers["req-1"]["moved"][0]["replica"] == "small#0"
    assert answers["req-2"]["state"] == "refused" and "No node is named 'nope'" in answers["req-2"]["error"]
    assert len(cluster.drain_answers) == 2  # each request answered once


def test_the_kv_answer_is_read_only_for_its_own_request():
    value = encode_answer("req-1", {"node": "laptop-1", "state": "drained"})
    assert decode_answer(value, "req-1") == {"node": "laptop-1", "state": "drained"}
    assert decode_answer(value, "req-0") is None  # a stale answer to an earlier run
    assert decode_answer(None, "req-1") is None and decode_answer(b"junk", "req-1") is None
    request = DrainRequest("laptop-1", "req-1", 60.0)
    assert DrainRequest.decode(b"homefleet:drain:laptop-1", request.encode()) == request
    assert DrainRequest.decode(b"homefleet:drained:laptop-1", request.encode()) is None


class DrainingHead:
    """The head as `join` reaches it through the GCS: answers a drain request after `answer_after_s`."""

    def __init__(self, clock, answer_after_s: float | None, unreachable: bool = False) -> None:
        self.clock = clock
        self.answer_after_s = answer_after_s
        self.unreachable = unreachable
        self.requests: list[DrainRequest] = []
        self.forgotten = 0

    def request_drain(self, request: DrainRequest) -> None:
        if self.unreachable:
            raise HeadUnreachable("connection refused")
        self.requests.append((request, self.clock()))

    def drain_answer(self, node: str, request_id: str) -> dict | None:
        request, at = self.requests[-1]
        if self.answer_after_s is not None and self.clock() - at >= self.answer_after_s:
            return {"node": node, "state": "drained", "seconds": self.answer_after_s, "moved": [], "stopped": []}
        return None

    def forget_drain(self, node: str) -> None:
        self.forgotten += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Running:
    def poll(self):
        return None


def keeper(head: DrainingHead, clock: Clock, lines: list[str], drain_timeout_s: float = 60.0) -> NodeKeeper:
    k = NodeKeeper("laptop-1", "head:6379", lambda: None, head, lines.append, clock=clock, sleep=clock.sleep,
                   drain_timeout_s=drain_timeout_s)
    k.worker = type("Worker", (), {"popen": Running(), "stop": lambda self: None})()
    k.own_ids.add("node-1")
    return k


def test_join_waits_for_the_heads_drain_before_leaving():
    clock = Clock()
    head = DrainingHead(clock, answer_after_s=3.0)
    lines: list[str] = []
    keeper(head, clock, lines)._drain_before_leaving()
    assert head.requests[0][0].node == "laptop-1" and head.requests[0][0].timeout_s == 60.0
    assert 3.0 <= clock.now < 4.0 and head.forgotten == 1
    assert lines[-1] == "homefleet: laptop-1 drained in 3.0 s: nothing was running there"


def test_join_leaves_after_the_drain_timeout_and_margin_when_the_head_does_not_answer():
    clock = Clock()
    lines: list[str] = []
    keeper(DrainingHead(clock, answer_after_s=None), clock, lines, drain_timeout_s=10)._drain_before_leaving()
    assert 40.0 <= clock.now <= 41.0  # 10 s + the 30 s margin
    assert "did not report laptop-1 drained within 40 s" in lines[-1]


def test_join_leaves_at_once_when_the_head_cannot_be_asked_or_draining_is_off():
    clock = Clock()
    lines: list[str] = []
    keeper(DrainingHead(clock, 1.0, unreachable=True), clock, lines)._drain_before_leaving()
    assert clock.now == 0 and "could not ask the head" in lines[-1]
    head = DrainingHead(clock, 1.0)
    keeper(head, clock, lines, drain_timeout_s=0)._drain_before_leaving()
    assert head.requests == []


def test_drain_timeouts_are_bounded():
    cluster = FakeCluster(["laptop-1"])
    controller = Controller(config([]), cluster)

    async def scenario():
        await ticks(controller)
        job = controller.start_drain("laptop-1", 10**9)
        return job.timeout_s

    assert asyncio.run(scenario()) == 3600.0


# ----------------------------------------------------------------------------- how it shows


def test_homefleet_status_shows_a_draining_node_with_its_live_use():
    from tests.unit.test_status_report import cell, node, section, view
    from orchestrator.status_report import render_status

    text = render_status(view([node("desktop"), node("laptop-1", state="draining", ram_gib=64, ram_free_gib=60)]))
    lines = section(text, "NODES")
    assert cell(lines, "STATE", "laptop-1") == "draining"
    assert cell(lines, "RAM", "laptop-1") == "4.0/64.0 GiB"  # alive: its live figures still show
    assert "(1 alive, 1 draining)" in text


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="node (Node.js) is not installed")
def test_the_dashboard_shows_a_draining_node_and_a_waking_model(tmp_path):
    from tests.unit.test_dashboard import node, render_page, text_of, view_json
    from orchestrator.cluster_view import ModelView

    waking = ModelView(name="big", context=8192, state="waking",
                       reason="sent Wake-on-LAN to laptop-1 at 192.168.1.21 (3c:7c:3f:1a:2b:4d) 4 s ago")
    out = render_page(view_json([node("desktop"), node("laptop-1", state="draining")], [waking]), tmp_path)
    assert 'pill state draining' in out["nodes"] and "◐ draining" in text_of(out["nodes"])
    assert "1 draining" in text_of(out["summary"]) and "1 waking" in text_of(out["summary"])
    assert "sent Wake-on-LAN to laptop-1" in text_of(out["models"])
