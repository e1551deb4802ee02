"""`homefleet models` as text: each node's store, file by file, and which models use them.

Pure: takes the `GET /api/cluster` view, returns a string.
"""

from __future__ import annotations

from orchestrator.cluster_view import ClusterView, ModelView
from orchestrator.core.hardware import format_bytes
from orchestrator.core.store_types import StoredFile


def users_of(file: StoredFile, node: str, models: list[ModelView]) -> list[str]:
    """Configured models that load this file on this node."""
    out = []
    for model in models:
        f = model.file
        if f is None or node not in f.holders:
            continue
        if (f.sha256 and file.sha256 == f.sha256) or (model.path and file.path.endswith("/" + model.path.lstrip("/"))) \
                or (f.name == file.name and (not f.sha256 or file.sha256 is None)):
            out.append(model.name)
    return out


def render_models(view: ClusterView) -> str:
    rows = [("NODE", "FILE", "SIZE", "SHA256", "USED BY")]
    notes = []
    for node in sorted(view.nodes, key=lambda n: (not n.is_head, n.name)):
        store = node.store
        if store is None:
            notes.append(f"{node.name}: no store report yet")
            continue
        free = format_bytes(store.disk_free_bytes) if store.disk_free_bytes is not None else "?"
        gone = " (gone)" if node.state == "gone" else ""
        notes.append(f"{node.name}{gone}: {store.models_dir}, {free} free")
        for f in sorted(store.files, key=lambda f: f.name):
            used = ", ".join(users_of(f, node.name, view.models)) or ("-  (prunable copy)" if f.copied_by_homefleet else "-")
            name = f.name + ("  [copy]" if f.copied_by_homefleet else "") + ("" if f.in_store else f"  ({f.path})")
            rows.append((node.name, name, format_bytes(f.size_bytes), (f.sha256 or "hashing...")[:12], used))
        for t in node.transfers:
            if t.active:
                pct = f"{t.percent:.0f}%" if t.percent is not None else format_bytes(t.bytes_done)
                rows.append((node.name, f"{t.name}  [{t.state} {pct} from {t.source}]",
                             format_bytes(t.total_bytes) if t.total_bytes else "?", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(["STORES", *("  " + n for n in notes), "", *lines]) + "\n"


def render_prune(result: dict) -> str:
    files = result.get("files", [])
    if not files:
        return "nothing to prune: every copy homefleet made is used by a configured model\n"
    verb = "would remove" if result.get("dry_run") else "removed"
    lines = []
    total = 0
    for f in files:
        status = verb if f.get("removed", result.get("dry_run")) else f"kept ({f.get('error')})"
        lines.append(f"{status}  {f['node']}:{f['name']}  {format_bytes(f['size_bytes'])}")
        total += f["size_bytes"] if f.get("removed") or result.get("dry_run") else 0
    lines.append(f"{verb} {format_bytes(total)} in all")
    return "\n".join(lines) + "\n"
