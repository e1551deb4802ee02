"""`homefleet plan` as text or JSON: the nodes planned on, the placement, the misfits.

Pure: takes snapshots and a PlacementResult, returns a string or a dict. Reasons are
printed in full, one node a line, under the replica they explain. SLOTS is the requests a
replica serves at once (`parallel`, chosen by placement when the model leaves it unset);
its memory figures are for that many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from orchestrator.core.hardware import format_bytes
from orchestrator.core.placement import Assignment, NodeSnapshot, PlacementResult
from orchestrator.status_report import short_gpu_name

COLUMN_GAP = "  "
REASON_INDENT = "    "
NO_MODELS = "no model configured: add some under `models:` in a config file and pass --config FILE"


def render_plan(
    result: PlacementResult,
    nodes: Sequence[NodeSnapshot],
    problems: Mapping[str, str] | None = None,
) -> str:
    """NODES, PLACEMENT and NOT PLACED sections; `problems` maps a model to why it has no demand."""
    sections = [_nodes_section(nodes), _placement_section(result, nodes, problems or {})]
    if result.unplaced or problems:
        sections.append(_unplaced_section(result, problems or {}))
    return "\n\n".join(sections) + "\n"


def plan_to_dict(
    result: PlacementResult,
    nodes: Sequence[NodeSnapshot],
    problems: Mapping[str, str] | None = None,
) -> dict:
    """The same plan as JSON-ready data (bytes as integers)."""
    return {
        "nodes": [_node_dict(n) for n in nodes],
        "assignments": [assignment_dict(a) for a in result.assignments],
        "unplaced": [{"model": u.model, "replica": u.replica, "reasons": dict(u.reasons)} for u in result.unplaced],
        "problems": dict(problems or {}),
    }


def assignment_dict(a: Assignment) -> dict:
    """An assignment as JSON-ready data (its helpers a list)."""
    return {**asdict(a), "helpers": [asdict(h) for h in a.helpers]}


# ----------------------------------------------------------------------------- sections


def _nodes_section(nodes: Sequence[NodeSnapshot]) -> str:
    if not nodes:
        return "NODES\nno nodes to plan on"
    rows = []
    for node in nodes:
        gpus = [
            f"{g.index}: {short_gpu_name(g.name)} {format_bytes(g.vram_free_bytes)} free of {format_bytes(g.vram_total_bytes)}"
            for g in node.gpus
        ] or ["none"]
        ram = f"{format_bytes(node.ram_free_bytes)} free" + (
            f" of {format_bytes(node.ram_total_bytes)}" if node.ram_total_bytes else ""
        )
        files = "any" if node.model_files is None else (", ".join(sorted(node.model_files)) or "none")
        rows.append([node.name, "alive" if node.alive else "gone", ram, gpus, files])
    return "NODES\n" + _table(["NAME", "STATE", "RAM", "GPU", "MODEL FILES"], rows)


def _placement_section(result: PlacementResult, nodes: Sequence[NodeSnapshot], problems: Mapping[str, str]) -> str:
    if not result.assignments and not result.unplaced and not problems:
        return "PLACEMENT\n" + NO_MODELS
    if not result.assignments:
        return "PLACEMENT\nnothing placed"
    gpu_names = {(n.name, g.index): short_gpu_name(g.name) for n in nodes for g in n.gpus}
    rows = [
        [
            a.model,
            str(a.replica),
            a.node,
            _gpu_cell(a, gpu_names),
            f"{a.gpu_layers}/{a.n_layers}",
            format_bytes(a.gpu_bytes) if a.gpu_index is not None else "-",
            format_bytes(a.ram_bytes),
            a.kind,
            str(a.parallel),
        ]
        for a in result.assignments
    ]
    headers = ["MODEL", "REPLICA", "NODE", "GPU", "LAYERS ON GPU", "EST. VRAM", "EST. RAM", "KIND", "SLOTS"]
    return "PLACEMENT\n" + _table(headers, rows, right_aligned={5, 6}) + _splits_weighed(result.assignments)


def _splits_weighed(assignments: Sequence[Assignment]) -> str:
    """Under the table, each split across machines that was weighed: both options and the verdict."""
    lines = []
    for a in assignments:
        if a.kind == "rpc":
            lines.append(f"{a.model}#{a.replica} across machines (llama.cpp RPC): {a.describe()}")
        elif a.split_why:
            lines.append(f"{a.model}#{a.replica} across machines (llama.cpp RPC) weighed:")
        else:
            continue
        lines.append(f"{REASON_INDENT}{a.split_why}")
    return "\n\n" + "\n".join(lines) if lines else ""


def _unplaced_section(result: PlacementResult, problems: Mapping[str, str]) -> str:
    lines = ["NOT PLACED"]
    for model, problem in problems.items():
        lines.append(f"{model}: {problem}")
    for u in result.unplaced:
        lines.append(f"{u.model} replica {u.replica}:")
        if not u.reasons:
            lines.append(f"{REASON_INDENT}{u.summary}")
        lines += [f"{REASON_INDENT}{node}: {reason}" for node, reason in u.reasons.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cells


def _gpu_cell(a: Assignment, gpu_names: Mapping[tuple[str, int], str]) -> str:
    if a.gpu_index is None:
        return "-"
    name = gpu_names.get((a.node, a.gpu_index))
    return f"{a.gpu_index}: {name}" if name else str(a.gpu_index)


def _node_dict(node: NodeSnapshot) -> dict:
    data = asdict(node)
    data["model_files"] = None if node.model_files is None else sorted(node.model_files)
    return data


def _table(headers: list[str], rows: list[list[str | list[str]]], right_aligned: set[int] | None = None) -> str:
    """Columns sized to their widest line; a cell given as a list spans several lines."""
    right_aligned = right_aligned or set()
    cells = [[[c] if isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for col, lines in enumerate(row):
            widths[col] = max(widths[col], *(len(line) for line in lines))

    def line(texts: list[str]) -> str:
        padded = [t.rjust(w) if col in right_aligned else t.ljust(w) for col, (t, w) in enumerate(zip(texts, widths))]
        return COLUMN_GAP.join(padded).rstrip()

    out = [line(headers)]
    for row in cells:
        for n in range(max(len(lines) for lines in row)):
            out.append(line([lines[n] if n < len(lines) else "" for lines in row]))
    return "\n".join(out)
