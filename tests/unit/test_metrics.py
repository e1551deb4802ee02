"""`/metrics` with prometheus_client: a fake cluster view rendered and parsed back with the
library's own parser; requests through the real app (fake replicas) moving the request,
latency, time-to-first-token, per-token and token series; load and copy durations from the
event log; one registry per app; `promtool check metrics` where Debian's prometheus is."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.cluster_view import ClusterView, EventView, ModelView, NodeView, ReplicaView
from orchestrator.core.hardware import GpuInfo, NodeHardware
from orchestrator.core.store_types import StoreReport, TransferProgress
from orchestrator.event_log import EventLog
from orchestrator.gateway.metrics import GatewayMetrics, RequestOutcome, usage_of_final_item
from tests.unit.test_gateway_fakes import (
    MODEL,
    FakeController,
    FakeReplicaHandle,
    Script,
    app_for,
    asgi_client,
    chat_answer,
    sse,
)

GIB = 1 << 30
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus exposition, read by prometheus_client."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels) -> float | None:
    return parsed.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def total(parsed: dict, name: str, **labels) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in parsed.items() if n == name and wanted <= ls)


# ----------------------------------------------------------------------------- the cluster view


def hardware(name: str, gpus: list[GpuInfo] = (), **extra) -> NodeHardware:
    return NodeHardware(name=name, ram_total_bytes=32 * GIB, ram_available_bytes=20 * GIB, gpus=list(gpus), **extra)


def fake_view() -> ClusterView:
    gpu = GpuInfo(index=0, name="RTX 4070", vram_total_bytes=12 * GIB, vram_free_bytes=5 * GIB, utilization_pct=75.0)
    copying = TransferProgress(transfer_id="t1", name="big.gguf", state="copying", source="desktop",
                               bytes_done=GIB, total_bytes=4 * GIB)
    nodes = [
        NodeView(name="desktop", address="10.0.0.1", is_head=True, requests_served=7,
                 hardware=hardware("desktop", [gpu], cpu_utilization_pct=50.0),
                 store=StoreReport(models_dir="/m", disk_free_bytes=100 * GIB)),
        NodeView(name="laptop-1", address="10.0.0.2", state="gone", hardware=hardware("laptop-1")),  # its old self
        NodeView(name="laptop-1", address="10.0.0.3", hardware=hardware("laptop-1"), transfers=[copying]),
    ]
    busy = ReplicaView(replica_id="gemma#0", node="desktop", state="ready", in_flight=6, slots=4, requests_served=7,
                       prompt_tokens=70, completion_tokens=140, threads=8, threads_now=4)
    models = [ModelView(name="gemma", context=4096, state="ready", replicas=[busy], in_flight=6),
              ModelView(name="big", context=4096, state="copying", waiting=2,
                        replicas=[ReplicaView(replica_id="big#0", node="laptop-1", state="copying")])]
    return ClusterView(nodes=nodes, models=models, generated_at=time.time(),
                       events=[EventView(id=1, at=1.0, kind="placed", model="big", node="laptop-1", reason="...")])


def test_nodes_gpus_and_replicas_come_from_the_cluster_view_at_scrape_time():
    parsed = samples(GatewayMetrics(fake_view).render().decode())
    assert value(parsed, "homefleet_node_up", node="desktop") == 1
    assert value(parsed, "homefleet_node_ram_total_bytes", node="desktop") == 32 * GIB
    assert value(parsed, "homefleet_node_ram_available_bytes", node="desktop") == 20 * GIB
    assert value(parsed, "homefleet_node_cpu_utilization_ratio", node="desktop") == 0.5
    assert value(parsed, "homefleet_node_disk_free_bytes", node="desktop") == 100 * GIB
    assert value(parsed, "homefleet_gpu_vram_free_bytes", node="desktop", gpu=0) == 5 * GIB
    assert value(parsed, "homefleet_gpu_vram_total_bytes", node="desktop", gpu=0) == 12 * GIB
    assert value(parsed, "homefleet_gpu_utilization_ratio", node="desktop", gpu=0) == 0.75
    assert value(parsed, "homefleet_node_requests_total", node="desktop") == 7
    replica = {"model": "gemma", "replica": "gemma#0", "node": "desktop"}
    assert value(parsed, "homefleet_replica_ready", **replica) == 1
    assert value(parsed, "homefleet_replica_in_flight", **replica) == 6
    assert value(parsed, "homefleet_replica_slots", **replica) == 4
    assert value(parsed, "homefleet_replica_slots_in_use", **replica) == 4
    assert value(parsed, "homefleet_replica_queue_depth", **replica) == 2  # six in flight on four slots
    assert value(parsed, "homefleet_replica_requests_total", **replica) == 7
    assert value(parsed, "homefleet_replica_threads", **replica) == 4  # half its 8 while another decodes
    assert value(parsed, "homefleet_replica_ready", model="big", replica="big#0", node="laptop-1") == 0
    assert value(parsed, "homefleet_model_waiting_requests", model="big") == 2
    assert value(parsed, "homefleet_transfer_done_bytes", node="laptop-1", file="big.gguf", source="desktop") == GIB
    assert value(parsed, "homefleet_transfer_size_bytes", node="laptop-1", file="big.gguf") == 4 * GIB


def test_a_machine_back_under_its_name_is_one_node_series_and_it_is_up():
    parsed = samples(GatewayMetrics(fake_view).render().decode())
    assert [v for (n, ls), v in parsed.items() if n == "homefleet_node_up" and ("node", "laptop-1") in ls] == [1]


def test_a_scrape_reads_the_view_afresh():
    view = fake_view()
    metrics = GatewayMetrics(lambda: view)
    assert value(samples(metrics.render().decode()), "homefleet_node_up", node="desktop") == 1
    view.nodes[0].state = "gone"
    assert value(samples(metrics.render().decode()), "homefleet_node_up", node="desktop") == 0


# ----------------------------------------------------------------------------- requests


@pytest.fixture
def anyio_backend():
    return "asyncio"  # the gateway runs on asyncio (Ray's loop)


def stream_with_usage(*pieces: str, prompt_tokens: int = 9) -> list[bytes]:
    """A replica's stream: the role, one item per piece, then the closing chunk with `usage`
    and [DONE] in one last item (as worker/replica.py sends them)."""
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    role = sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    items = [role + sse({**chunk, "choices": [{"index": 0, "delta": {"content": pieces[0]}}]})]
    items += [sse({**chunk, "choices": [{"index": 0, "delta": {"content": p}}]}) for p in pieces[1:]]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
             "total_tokens": prompt_tokens + len(pieces)}
    closing = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
    items.append(sse(closing) + b"data: [DONE]\n\n")
    return items


@pytest.fixture
def handle() -> FakeReplicaHandle:
    return FakeReplicaHandle()


@pytest.fixture
def fleet(handle) -> FakeController:
    controller = FakeController(gateway={"queue_per_replica": 1})
    controller.add_replica(MODEL, handle)
    return controller


async def scrape(client) -> dict:
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.text)


@pytest.mark.anyio
async def test_a_streamed_and_a_whole_request_move_latency_first_token_per_token_and_tokens(fleet, handle):
    handle.will(Script(events=stream_with_usage("One", " two", " three", " four"))).will(Script(answer=chat_answer()))
    async with asgi_client(app_for(fleet)) as client:
        before = await scrape(client)
        assert (await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        after = await scrape(client)
    where = {"model": MODEL, "node": "desktop"}

    def moved(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("homefleet_requests_total", status=200, **where) == 2
    assert moved("homefleet_request_duration_seconds_count", **where) == 2
    assert moved("homefleet_time_to_first_token_seconds_count", **where) == 1  # the streamed one only
    assert moved("homefleet_time_per_output_token_seconds_count", **where) == 1
    assert moved("homefleet_prompt_tokens_total", model=MODEL) == 9 + 5  # the stream's usage, then the answer's
    assert moved("homefleet_completion_tokens_total", model=MODEL) == 4 + 2
    record = fleet.replicas[(MODEL, 0)]
    assert (record.prompt_tokens, record.completion_tokens) == (14, 6)  # for the cluster view's replica


@pytest.mark.anyio
async def test_an_engine_error_counts_with_its_status_and_no_tokens(fleet, handle):
    error = {"message": "too long", "status": 400, "type": "invalid_request_error", "param": "messages",
             "code": "context_length_exceeded"}
    handle.will(Script(answer={"error": error}))
    async with asgi_client(app_for(fleet)) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 400
        parsed = await scrape(client)
    assert value(parsed, "homefleet_requests_total", model=MODEL, node="desktop", status=400) == 1
    assert total(parsed, "homefleet_completion_tokens_total") == 0


@pytest.mark.anyio
async def test_a_request_no_replica_could_take_counts_as_a_503_without_a_node(fleet):
    fleet.replicas.clear()
    async with asgi_client(app_for(fleet)) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 503
        parsed = await scrape(client)
    assert value(parsed, "homefleet_requests_total", model=MODEL, node="", status=503) == 1


@pytest.mark.anyio
async def test_each_app_counts_its_own_requests(fleet):
    first, second = app_for(fleet), app_for(fleet)
    async with asgi_client(first) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        assert total(await scrape(client), "homefleet_requests_total") == 1
    async with asgi_client(second) as client:
        assert total(await scrape(client), "homefleet_requests_total") == 0


@pytest.mark.parametrize(("item", "usage"), [
    (stream_with_usage("a", "b")[-1], {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
    # stream_options.include_usage: a last chunk with no choices
    (sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}) + b"data: [DONE]\n\n",
     {"prompt_tokens": 3, "completion_tokens": 1}),
    (b"data: [DONE]\n\n", None),
    (sse('{"usage": "not json'), None),
])
def test_usage_is_read_from_a_streams_final_item(item, usage):
    assert usage_of_final_item(item) == usage


def test_a_whole_answer_observes_latency_but_no_first_token():
    metrics = GatewayMetrics(fake_view)
    metrics.request_done(RequestOutcome("gemma", "desktop", 200, 10.0, 12.0, None,
                                        {"prompt_tokens": 5, "completion_tokens": 20}))
    metrics.request_done(RequestOutcome("gemma", "desktop", 200, 10.0, 13.0, 10.5,
                                        {"prompt_tokens": 5, "completion_tokens": 11}))
    parsed = samples(metrics.render().decode())
    where = {"model": "gemma", "node": "desktop"}
    assert value(parsed, "homefleet_request_duration_seconds_sum", **where) == 5.0
    assert value(parsed, "homefleet_time_to_first_token_seconds_sum", **where) == 0.5
    assert value(parsed, "homefleet_time_per_output_token_seconds_sum", **where) == pytest.approx(0.25)  # 2.5 s / 10


# ----------------------------------------------------------------------------- loads and copies


def test_load_and_copy_durations_come_from_the_event_log():
    log, metrics = EventLog(), GatewayMetrics(fake_view)
    log.listeners.append(metrics.on_event)
    log.record("loaded", "gemma", "desktop", "gemma#0 ready in 3.5 s", seconds=3.5)
    log.record("moved", "gemma", "laptop-1", "gemma#0 moved from desktop to laptop-1", seconds=1.5)
    log.record("copied", "big", "laptop-1", "big.gguf copied ...", seconds=42.0, bytes=4 * GIB, method="copy")
    log.record("evicted", "big", "laptop-1", "room for gemma")  # no duration: no observation
    parsed = samples(metrics.render().decode())
    assert value(parsed, "homefleet_model_load_duration_seconds_sum", model="gemma", node="desktop") == 3.5
    assert total(parsed, "homefleet_model_load_duration_seconds_count") == 2
    assert value(parsed, "homefleet_model_copy_duration_seconds_count", model="big", node="laptop-1",
                 method="copy") == 1
    assert value(parsed, "homefleet_model_copy_duration_seconds_bucket", model="big", node="laptop-1", method="copy",
                 le="60.0") == 1


def test_the_real_controllers_events_reach_the_apps_metrics():
    from orchestrator.controller import Controller
    from orchestrator.gateway.app import create_app
    from tests.unit.test_controller import LAB, FakeCluster, config

    controller = Controller(config([{"name": "r1", "path": "deepseek-r1-distill-qwen-7b.gguf"}]), FakeCluster(LAB))
    create_app(controller, controller.config)
    [listener] = controller.events.listeners
    controller.record_event("loaded", "r1", "desktop", "r1#0 ready in 2.0 s", seconds=2.0)
    parsed = samples(listener.__self__.render().decode())
    assert value(parsed, "homefleet_model_load_duration_seconds_count", model="r1", node="desktop") == 1


# ----------------------------------------------------------------------------- promtool


def populated_metrics() -> bytes:
    metrics = GatewayMetrics(fake_view)
    metrics.request_done(RequestOutcome("gemma", "desktop", 200, 0.0, 2.0, 0.2, {"prompt_tokens": 5,
                                                                                "completion_tokens": 9}))
    metrics.refused("gemma", 503)
    metrics.on_event({"kind": "loaded", "model": "gemma", "node": "desktop", "seconds": 3.0})
    metrics.on_event({"kind": "copied", "model": "big", "node": "laptop-1", "seconds": 30.0, "method": "download"})
    return metrics.render()


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is absent (Debian's `prometheus` package: apt-get install prometheus)")
def test_promtool_finds_nothing_to_say_about_the_names():
    checked = subprocess.run(["promtool", "check", "metrics"], input=populated_metrics(), capture_output=True,
                             timeout=60)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_every_family_has_help_and_conventional_units():
    families = list(text_string_to_metric_families(populated_metrics().decode()))
    names = {f.name for f in families}
    assert {"homefleet_requests", "homefleet_request_duration_seconds", "homefleet_time_to_first_token_seconds",
            "homefleet_time_per_output_token_seconds", "homefleet_prompt_tokens", "homefleet_completion_tokens",
            "homefleet_model_load_duration_seconds", "homefleet_model_copy_duration_seconds"} <= names
    for family in families:
        assert family.name.startswith("homefleet_") and family.documentation, family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
