"""The shape of `GET /api/cluster`: what the CLI's `status` and the dashboard read.

One snapshot of the cluster as the controller sees it: nodes with their hardware and live
use, models with where each replica runs and why a model is pending or failed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

from orchestrator.core.hardware import NodeHardware
from orchestrator.core.rpc_split import describe_split
from orchestrator.core.store_types import StoreReport, TransferProgress

NodeState = Literal["alive", "draining", "gone"]  # draining: alive, but placement leaves it out
ReplicaState = Literal["not_loaded", "pending", "waking", "copying", "downloading", "loading", "ready", "unloading",
                       "failed", "stopped"]


class NodeView(BaseModel):
    name: str
    address: str = Field(..., description="Node IP as Ray sees it.")
    ray_node_id: str | None = None
    state: NodeState = "alive"
    is_head: bool = False
    hardware: NodeHardware = Field(..., description="Hardware and live use, as last reported.")
    reported_at: float | None = Field(None, description="Unix time of the last agent report.")
    model_files: list[str] = Field(default_factory=list, description="Configured models whose file this node holds.")
    store: StoreReport | None = Field(None, description="The node's model store: files, their sha256, free disk.")
    transfers: list[TransferProgress] = Field(default_factory=list, description="Files coming into its store.")
    requests_served: int = 0
    speed_factor: float | None = Field(
        None, description="Measured / predicted decode speed on this node (from its replicas' requests)."
    )
    wake_mac: str | None = Field(None, description="MAC the head sends Wake-on-LAN to while the node sleeps.")


class HelperView(BaseModel):
    """A helper node's GPU in a split across machines (llama.cpp RPC)."""

    node: str
    gpu_index: int
    layers: int = Field(..., description="Offloaded layers on that GPU (the first ones).")
    gpu_bytes: int = Field(0, description="Estimated VRAM of its part.")


class ReplicaView(BaseModel):
    replica_id: str
    node: str | None = None
    state: ReplicaState
    reason: str | None = Field(None, description="Why pending or failed; None when ready.")
    gpu_index: int | None = None
    gpu_layers: int = 0
    total_layers: int = 0
    estimated_gpu_bytes: int | None = None
    estimated_ram_bytes: int | None = None
    measured_gpu_bytes: int | None = None
    measured_ram_bytes: int | None = None
    load_seconds: float | None = None
    decode_tokens_per_s: float | None = Field(None, description="Measured on recent requests.")
    in_flight: int = 0
    slots: int = Field(1, description="Requests it decodes at once.")
    threads: int | None = Field(None, description="CPU threads it decodes with when it is the only replica "
                                "decoding on its machine.")
    threads_now: int | None = Field(None, description="CPU threads it decodes with now: its share while other "
                                    "replicas on the machine decode too.")
    requests_served: int = 0
    prompt_tokens: int = Field(0, description="Prompt tokens of the requests it served (from their `usage`).")
    completion_tokens: int = Field(0, description="Answer tokens it generated for the requests it served.")
    transfer: TransferProgress | None = Field(None, description="Its file coming to the node (copying/downloading).")
    helpers: list[HelperView] = Field(
        default_factory=list, description="Split across machines: the other nodes' GPUs, over llama.cpp RPC."
    )
    predicted_tokens_per_s: float | None = Field(None, description="Decode speed placement predicted, where a "
                                                 "split across machines was weighed.")
    split_why: str | None = Field(None, description="Why a split across machines was (not) taken, in numbers.")

    @computed_field  # the closed loop: how far the estimate was from what the replica really uses
    @property
    def measured_over_estimated(self) -> float | None:
        estimated = (self.estimated_gpu_bytes or 0) + (self.estimated_ram_bytes or 0)
        if self.measured_ram_bytes is None or estimated <= 0:
            return None
        measured = self.measured_ram_bytes + (self.measured_gpu_bytes or 0)
        return round(measured / estimated, 3)

    @computed_field  # in the JSON too, so the dashboard need not repeat the rule
    @property
    def processor(self) -> str:
        """GPU/CPU split the way `ollama ps` prints it."""
        if self.total_layers <= 0 or self.state not in ("ready", "loading", "copying", "downloading"):
            return "-"
        if self.helpers:  # `desktop 45 layers GPU + laptop-1 20 layers GPU (RPC)`
            home = self.gpu_layers - sum(h.layers for h in self.helpers)
            return describe_split(self.node or "?", home, [(h.node, h.layers) for h in self.helpers])
        if self.gpu_layers <= 0:
            return "100% CPU"
        if self.gpu_layers >= self.total_layers:
            return "100% GPU"
        gpu_pct = round(100 * self.gpu_layers / self.total_layers)
        return f"{100 - gpu_pct}%/{gpu_pct}% CPU/GPU"


class ModelFileView(BaseModel):
    name: str | None = Field(None, description="The file's name in a node's store.")
    sha256: str | None = Field(None, description="Expected: the pin, the URL's published hash, or the user's file's.")
    size_bytes: int | None = None
    holders: list[str] = Field(default_factory=list, description="Nodes holding a file they can load.")
    url: str | None = None


class ModelView(BaseModel):
    name: str
    path: str | None = None
    file: ModelFileView | None = None
    context: int
    state: ReplicaState = Field(..., description="ready if any replica is ready, else the most telling state.")
    reason: str | None = None
    replicas: list[ReplicaView] = Field(default_factory=list)
    estimate_source: str | None = Field(None, description="Where the memory estimate came from.")
    load: str = Field("always", description="`always` (loaded at start) or `on_demand` (by its first request).")
    keep_alive: str | None = Field(None, description="How long it stays loaded after its last request (None: for ever).")
    unloads_in_s: float | None = Field(None, description="When ready and idle: seconds until its idle unload.")
    in_flight: int = Field(0, description="Requests being served or queued on its replicas.")
    waiting: int = Field(0, description="Requests waiting for it to load.")


class EventView(BaseModel):
    id: int = Field(..., description="Grows by one with each event: `GET /api/events?since=ID` gives the newer ones.")
    at: float = Field(..., description="Unix time.")
    kind: str = Field(..., description="placed, copied, loaded, evicted, idle_unload, node_gone, node_back, crashed, "
                      "moved, waking, ...")
    model: str
    node: str | None = None
    reason: str


class ClusterView(BaseModel):
    nodes: list[NodeView] = Field(default_factory=list)
    models: list[ModelView] = Field(default_factory=list)
    events: list[EventView] = Field(default_factory=list, description="The latest loads and unloads, oldest first.")
    generated_at: float
