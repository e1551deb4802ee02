"""The controller's state as the `/api/cluster` view (orchestrator/cluster_view.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from orchestrator.cluster_view import (
    ClusterView,
    EventView,
    HelperView,
    ModelFileView,
    ModelView,
    NodeView,
    ReplicaView,
)
from orchestrator.core.keep_alive import describe_keep_alive

EVENTS_SHOWN = 100  # placements are events too: room for as many loads and unloads as before

if TYPE_CHECKING:
    from orchestrator.controller import Controller, ReplicaRecord


def cluster_view(controller: Controller) -> ClusterView:
    nodes = []
    for node in controller.nodes.values():
        if node.hardware is None:
            continue
        nodes.append(
            NodeView(
                name=node.name or node.node_id,
                address=node.address,
                ray_node_id=node.node_id,
                state=("draining" if node.draining else "alive") if node.alive else "gone",
                is_head=node.is_head,
                hardware=node.hardware_with_measurements(),
                reported_at=node.reported_at,
                speed_factor=node.speed_factor,
                wake_mac=node.mac,
                model_files=sorted(m for m in controller.files.files if node.name in controller.files.holders(m)),
                requests_served=node.requests_served,
                store=node.store,
                transfers=list(node.transfers.values()),
            )
        )
    models = []
    for model in controller.config.models:
        state, reason = controller.waking_state(model.name) or controller.model_state(model.name)
        replicas = [_replica_view(r) for r in controller.replicas.values() if r.model == model.name]
        replicas += [_replica_view(r) for (m, _), r in controller.failed_keys.items() if m == model.name]
        for index in range(model.replicas):
            if (model.name, index) not in controller.replicas and (model.name, index) not in controller.failed_keys:
                replicas.append(
                    ReplicaView(
                        replica_id=f"{model.name}#{index}",
                        state=state if state in ("pending", "waking", "failed", "not_loaded") else "pending",
                        reason=(reason if state in ("pending", "waking", "failed", "not_loaded") else None)
                        or controller.unplaced_reason(model.name) or "waiting for a node with room",
                    )
                )
        files = controller.files.files.get(model.name)
        file_view = None
        if model.path or model.url:
            file_view = ModelFileView(
                name=model.file_name, url=model.url,
                sha256=files.expected_sha256 if files else model.sha256,
                size_bytes=files.size_bytes if files else None,
                holders=sorted(files.holders) if files else [],
            )
        models.append(
            ModelView(
                name=model.name, path=model.path, file=file_view, context=model.context, state=state, reason=reason,
                replicas=replicas, estimate_source=controller.estimate_source(model.name),
                load=model.load, keep_alive=describe_keep_alive(controller.keep_alive_s(model.name)),
                unloads_in_s=controller.unloads_in_s(model.name) if state == "ready" else None,
                in_flight=sum(r.in_flight for r in controller.replicas.values() if r.model == model.name),
                waiting=controller.waiting.get(model.name, 0),
            )
        )
    events = [EventView(**e) for e in controller.events.since(limit=EVENTS_SHOWN)]
    return ClusterView(nodes=nodes, models=models, events=events, generated_at=time.time())


def _replica_view(r: ReplicaRecord) -> ReplicaView:
    memory = r.info.get("memory") or {}
    a = r.assignment
    return ReplicaView(
        replica_id=r.replica_id,
        node=r.node_name,
        state=r.state,
        reason=r.reason,
        gpu_index=a.gpu_index,
        gpu_layers=a.gpu_layers,
        total_layers=a.n_layers,
        estimated_gpu_bytes=a.gpu_bytes,
        estimated_ram_bytes=a.ram_bytes,
        measured_gpu_bytes=memory.get("vram_bytes"),
        measured_ram_bytes=memory.get("rss_bytes"),
        load_seconds=r.info.get("load_seconds"),
        decode_tokens_per_s=r.info.get("decode_tokens_per_s"),
        in_flight=r.in_flight,
        slots=r.slots,
        threads=r.info.get("threads"),
        threads_now=r.info.get("threads_now"),
        requests_served=r.served,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        transfer=r.transfer,
        helpers=[HelperView(**vars(h)) for h in a.helpers],
        predicted_tokens_per_s=a.tokens_per_s,
        split_why=a.split_why,
    )
