"""Prometheus `/metrics`, with prometheus_client: one registry per app (tests build several
apps in one process; the library's global default registry is never used).

Two sources:
- Observed as things end: each request when its flight ends (gateway/relay.py): requests by
  model, node and status, latency, time to first token and per output token, prompt and
  completion tokens; each load and copy from the controller's event log (`loaded`, `moved`
  and `copied` events carry their `seconds`).
- Read from the cluster view at each scrape (`ClusterCollector`), so they are never stale:
  nodes (up, RAM, VRAM, GPU utilization, disk), replicas (ready, in flight, queued, slots in
  use), copies in flight, requests served.

Times are from the moment a replica takes the request (its queue on the replica included,
an on-demand load before it not). Time to first token and per output token are observed for
streamed requests only: a whole answer has no first token to time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.cluster_view import ClusterView

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
COPY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
SSE_DONE = b"data: [DONE]\n\n"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


@dataclass(frozen=True)
class RequestOutcome:
    """What one request's flight saw (monotonic seconds)."""

    model: str
    node: str
    status: int  # 200 served; the error's status; 499 when the client left first
    started_at: float
    ended_at: float
    first_token_at: float | None = None  # streamed requests only
    usage: dict | None = None

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)


def usage_of_final_item(item: bytes) -> dict | None:
    """The `usage` of a stream's last item (the one that ends with `data: [DONE]`): its events
    from the end, the first that carries usage. Only that item is parsed: a gateway on a small
    machine should not read every chunk."""
    for event in reversed(item.split(b"\n\n")):
        if b'"usage"' not in event or not event.startswith(b"data: "):
            continue
        try:
            usage = json.loads(event[len(b"data: "):]).get("usage")
        except (ValueError, AttributeError):
            return None
        return usage if isinstance(usage, dict) else None
    return None


class GatewayMetrics:
    def __init__(self, view: Callable[[], ClusterView]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("homefleet_requests", "Requests by how they ended (status: 200 served, the "
                                "error's HTTP status, 499 the client left; node empty: no replica took it).",
                                ["model", "node", "status"], registry=r)
        self.latency = Histogram("homefleet_request_duration_seconds", "From a replica taking the request to "
                                 "its last byte.", ["model", "node"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("homefleet_time_to_first_token_seconds", "Streamed requests: from a replica "
                                     "taking the request to its first token.", ["model", "node"],
                                     buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.per_token = Histogram("homefleet_time_per_output_token_seconds", "Streamed requests: seconds per "
                                   "answer token after the first.", ["model", "node"], buckets=TOKEN_BUCKETS,
                                   registry=r)
        self.prompt_tokens = Counter("homefleet_prompt_tokens", "Prompt tokens of served requests.", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("homefleet_completion_tokens", "Answer tokens of served requests.",
                                         ["model"], registry=r)
        self.load_duration = Histogram("homefleet_model_load_duration_seconds", "Loading a replica of a model "
                                       "(llama.cpp's load, once its file is on the node).", ["model", "node"],
                                       buckets=LOAD_BUCKETS, registry=r)
        self.copy_duration = Histogram("homefleet_model_copy_duration_seconds", "Bringing a model's file to a "
                                       "node (method: copy from a peer, or download from its URL).",
                                       ["model", "node", "method"], buckets=COPY_BUCKETS, registry=r)
        r.register(ClusterCollector(view))

    def request_done(self, outcome: RequestOutcome) -> None:
        model, node = outcome.model, outcome.node
        self.requests.labels(model, node, str(outcome.status)).inc()
        self.latency.labels(model, node).observe(outcome.ended_at - outcome.started_at)
        if outcome.usage is not None:
            self.prompt_tokens.labels(model).inc(outcome.prompt_tokens)
            self.completion_tokens.labels(model).inc(outcome.completion_tokens)
        # A stream that generated nothing had no first token (its one item was the end).
        if outcome.first_token_at is not None and outcome.status == 200 and (
                outcome.usage is None or outcome.completion_tokens > 0):
            self.first_token.labels(model, node).observe(outcome.first_token_at - outcome.started_at)
            if outcome.completion_tokens > 1:
                per_token = (outcome.ended_at - outcome.first_token_at) / (outcome.completion_tokens - 1)
                self.per_token.labels(model, node).observe(per_token)

    def refused(self, model: str, status: int) -> None:
        """No replica could take it (none ready, all busy)."""
        self.requests.labels(model, "", str(status)).inc()

    def on_event(self, event: dict) -> None:
        """A listener of the controller's event log (orchestrator/event_log.py)."""
        seconds = event.get("seconds")
        if seconds is None or event.get("node") is None:
            return
        if event["kind"] in ("loaded", "moved"):
            self.load_duration.labels(event["model"], event["node"]).observe(seconds)
        elif event["kind"] == "copied":
            self.copy_duration.labels(event["model"], event["node"], event.get("method") or "copy").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ClusterCollector(Collector):
    """Nodes and replicas as the cluster view shows them at scrape time."""

    def __init__(self, view: Callable[[], ClusterView]) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # the series depend on the cluster: nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        # A machine that left and joined again has an old "gone" record: one series per name.
        alive = {n.name for n in view.nodes if n.state != "gone"}
        nodes = [n for n in view.nodes if n.state != "gone" or n.name not in alive]

        def gauge(name: str, text: str, labels: list[str], samples) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            for values, value in samples:
                if value is not None:
                    family.add_metric([str(v) for v in values], value)
            return family

        yield gauge("homefleet_node_up", "1 while the node is alive.", ["node"],
                    [((n.name,), 0 if n.state == "gone" else 1) for n in nodes])
        yield gauge("homefleet_node_draining", "1 while the node drains (placement leaves it out).", ["node"],
                    [((n.name,), 1 if n.state == "draining" else 0) for n in nodes])
        yield gauge("homefleet_node_ram_available_bytes", "RAM available on the node.", ["node"],
                    [((n.name,), n.hardware.ram_available_bytes) for n in nodes])
        yield gauge("homefleet_node_ram_total_bytes", "RAM installed in the node.", ["node"],
                    [((n.name,), n.hardware.ram_total_bytes) for n in nodes])
        yield gauge("homefleet_node_cpu_utilization_ratio", "CPU busy share of the node (0-1).", ["node"],
                    [((n.name,), _ratio(n.hardware.cpu_utilization_pct)) for n in nodes])
        yield gauge("homefleet_node_disk_free_bytes", "Free disk of the node's model store.", ["node"],
                    [((n.name,), n.store.disk_free_bytes if n.store is not None else n.hardware.disk_free_bytes)
                     for n in nodes])
        gpus = [(n, g) for n in nodes for g in n.hardware.gpus]
        yield gauge("homefleet_gpu_vram_free_bytes", "Free VRAM per GPU.", ["node", "gpu"],
                    [((n.name, g.index), g.vram_free_bytes) for n, g in gpus])
        yield gauge("homefleet_gpu_vram_total_bytes", "VRAM per GPU.", ["node", "gpu"],
                    [((n.name, g.index), g.vram_total_bytes) for n, g in gpus])
        yield gauge("homefleet_gpu_utilization_ratio", "GPU busy share (0-1).", ["node", "gpu"],
                    [((n.name, g.index), _ratio(g.utilization_pct)) for n, g in gpus])
        active = [(n, t) for n in nodes for t in n.transfers if t.active]
        yield gauge("homefleet_transfer_done_bytes", "Bytes of a model file copied so far into a node's store.",
                    ["node", "file", "source"], [((n.name, t.name, t.source or ""), t.bytes_done) for n, t in active])
        yield gauge("homefleet_transfer_size_bytes", "Size of a model file being copied into a node's store.",
                    ["node", "file"], [((n.name, t.name), t.total_bytes) for n, t in active])
        served = CounterMetricFamily("homefleet_node_requests", "Requests served by the node.", labels=["node"])
        for n in nodes:
            served.add_metric([n.name], n.requests_served)
        yield served
        replicas = [(m, r) for m in view.models for r in m.replicas]
        labels = ["model", "replica", "node"]
        yield gauge("homefleet_replica_ready", "1 while the replica serves.", labels,
                    [((m.name, r.replica_id, r.node or ""), 1 if r.state == "ready" else 0) for m, r in replicas])
        placed = [(m, r) for m, r in replicas if r.node]
        yield gauge("homefleet_replica_in_flight", "Requests decoding or queued on the replica.", labels,
                    [((m.name, r.replica_id, r.node), r.in_flight) for m, r in placed])
        yield gauge("homefleet_replica_queue_depth", "Requests waiting on the replica for a free slot.", labels,
                    [((m.name, r.replica_id, r.node), max(0, r.in_flight - r.slots)) for m, r in placed])
        yield gauge("homefleet_replica_slots_in_use", "Slots decoding a request now.", labels,
                    [((m.name, r.replica_id, r.node), min(r.in_flight, r.slots)) for m, r in placed])
        yield gauge("homefleet_replica_slots", "Requests the replica decodes at once.", labels,
                    [((m.name, r.replica_id, r.node), r.slots) for m, r in placed])
        yield gauge("homefleet_replica_threads", "CPU threads the replica decodes with now: its share of the "
                    "machine's cores while other replicas there decode too.", labels,
                    [((m.name, r.replica_id, r.node), r.threads_now) for m, r in placed if r.threads_now is not None])
        yield gauge("homefleet_model_waiting_requests", "Requests waiting for the model to load.", ["model"],
                    [((m.name,), m.waiting) for m in view.models])
        replica_served = CounterMetricFamily("homefleet_replica_requests", "Requests the replica served.",
                                             labels=labels)
        for m, r in placed:
            replica_served.add_metric([m.name, r.replica_id, r.node], r.requests_served)
        yield replica_served


def _ratio(percent: float | None) -> float | None:
    return None if percent is None else percent / 100.0


def metrics_routes(metrics: GatewayMetrics) -> APIRouter:
    api = APIRouter()

    @api.get("/metrics", tags=["probes"], response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition, version 0.0.4.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        """Requests, tokens, latencies, loads and copies; nodes, GPUs and replicas, for Prometheus."""
        return PlainTextResponse(metrics.render(), media_type=PROMETHEUS_TEXT)

    return api
