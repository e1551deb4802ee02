"""Prometheus text exposition of the cluster view (no client library needed)."""

from __future__ import annotations

from orchestrator.cluster_view import ClusterView


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**values: object) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in values.items()) + "}"


def render_metrics(view: ClusterView) -> str:
    lines: list[str] = []
    # A machine that left and joined again has an old "gone" record: one series per name.
    alive = {n.name for n in view.nodes if n.state != "gone"}
    view = view.model_copy(update={"nodes": [n for n in view.nodes if n.state != "gone" or n.name not in alive]})

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(**labels)} {value}" for labels, value in samples)

    metric("homefleet_node_up", "gauge", "1 while the node is alive.",
           [({"node": n.name}, 0 if n.state == "gone" else 1) for n in view.nodes])
    metric("homefleet_node_ram_available_bytes", "gauge", "RAM available on the node.",
           [({"node": n.name}, n.hardware.ram_available) for n in view.nodes])
    metric("homefleet_gpu_vram_free_bytes", "gauge", "Free VRAM per GPU.",
           [({"node": n.name, "gpu": g.index}, g.vram_free) for n in view.nodes for g in n.hardware.gpus])
    metric("homefleet_node_disk_free_bytes", "gauge", "Free disk of the node's model store.",
           [({"node": n.name}, n.store.disk_free_bytes) for n in view.nodes
            if n.store is not None and n.store.disk_free_bytes is not None])
    active = [(n, t) for n in view.nodes for t in n.transfers if t.active]
    metric("homefleet_transfer_bytes", "gauge", "Bytes of a model file copied so far into a node's store.",
           [({"node": n.name, "file": t.name, "source": t.source or ""}, t.bytes_done) for n, t in active])
    metric("homefleet_transfer_size_bytes", "gauge", "Size of a model file being copied into a node's store.",
           [({"node": n.name, "file": t.name}, t.total_bytes) for n, t in active if t.total_bytes])
    metric("homefleet_node_requests_total", "counter", "Requests served by the node.",
           [({"node": n.name}, n.requests_served) for n in view.nodes])
    replicas = [(m, r) for m in view.models for r in m.replicas]
    metric("homefleet_replica_ready", "gauge", "1 while the replica serves.",
           [({"model": m.name, "replica": r.replica_id, "node": r.node or ""}, 1 if r.state == "ready" else 0) for m, r in replicas])
    metric("homefleet_replica_in_flight", "gauge", "Requests running or queued on the replica.",
           [({"model": m.name, "replica": r.replica_id}, r.in_flight) for m, r in replicas])
    metric("homefleet_replica_requests_total", "counter", "Requests the replica served.",
           [({"model": m.name, "replica": r.replica_id}, r.requests_served) for m, r in replicas])
    return "\n".join(lines) + "\n"
