"""`homefleet status` as text: a NODES table and a MODELS table from one ClusterView.

Pure: takes the snapshot the gateway serves at `GET /api/cluster` and returns a string.
Cells may span several lines (one GPU or one model a line); reasons for pending or failed
models are printed in full, wrapped under their row, never cut to fit a column.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.cluster_view import ClusterView, ModelView, NodeView
from orchestrator.core.hardware import GIB, GpuInfo, format_bytes

DEFAULT_WIDTH = 100
COLUMN_GAP = "  "
REASON_INDENT = "    "

# ANSI styles, applied only when color=True and only after padding (so widths stay right).
_STYLE_CODES = {
    "bold": "1",
    "dim": "2",
    "green": "32",
    "yellow": "33",
    "red": "31",
    "cyan": "36",
}
STATE_STYLES = {
    "alive": "green",
    "gone": "red",
    "ready": "green",
    "loading": "cyan",
    "pending": "yellow",
    "failed": "red",
    "stopped": "dim",
}
# Model names a node lists: replicas in these states live (or are about to) on it.
HELD_STATES = ("ready", "loading", "pending")
# Prefixes dropped from GPU marketing names: "NVIDIA GeForce RTX 4070 Ti" -> "RTX 4070 Ti".
GPU_NAME_PREFIXES = ("NVIDIA ", "GeForce ")


def render_status(view: ClusterView, color: bool = False, width: int = DEFAULT_WIDTH) -> str:
    """Both tables, separated by a blank line; `width` only governs how reasons wrap."""
    painter = _Painter(color)
    return "\n\n".join([_nodes_section(view, painter), _models_section(view, painter, width)]) + "\n"


# ----------------------------------------------------------------------------- sections


def _nodes_section(view: ClusterView, painter: _Painter) -> str:
    title = painter("bold", "NODES") + _counts_suffix(Counter(n.state for n in view.nodes), ("alive", "gone"))
    if not view.nodes:
        return title + "\n" + painter("dim", "no node has joined yet: run `homefleet join HEAD:6379` on each machine")
    table = _Table(["NAME", "ADDRESS", "STATE", "CPU", "RAM", "GPU", "MODELS"])
    for node in sorted(view.nodes, key=lambda n: (not n.is_head, n.name)):
        table.add(
            [
                node.name + (" (head)" if node.is_head else ""),
                node.address,
                _node_state_lines(node, view.generated_at),
                _cpu_text(node),
                _ram_text(node),
                _gpu_lines(node),
                _models_on(node.name, view.models),
            ],
            styles={2: STATE_STYLES[node.state]},
        )
    return title + "\n" + table.render(painter)


def _models_section(view: ClusterView, painter: _Painter, width: int) -> str:
    states = Counter(m.state for m in view.models)
    title = painter("bold", "MODELS") + _counts_suffix(states, ("ready", "loading", "pending", "failed", "stopped"))
    if not view.models:
        return title + "\n" + painter("dim", "no model configured: add some under `models:` in the config file")
    table = _Table(
        ["MODEL", "REPLICA", "NODE", "PROCESSOR", "EST. MEM", "MEASURED", "STATE"],
        right_aligned={4, 5},
    )
    for model in view.models:
        _add_model_rows(table, model, width)
    return title + "\n" + table.render(painter)


def _add_model_rows(table: _Table, model: ModelView, width: int) -> None:
    if not model.replicas:
        table.add(
            [model.name, "-", "-", "-", "-", "-", model.state],
            styles={6: STATE_STYLES[model.state]},
            notes=_reason_notes(model.reason, width),
            note_style=STATE_STYLES[model.state],
        )
        return
    replica_reasons = {r.reason for r in model.replicas}
    for i, replica in enumerate(model.replicas):
        table.add(
            [
                model.name if i == 0 else "",
                _short_replica_id(replica.replica_id, model.name),
                replica.node or "-",
                replica.processor,
                format_bytes(_total(replica.estimated_gpu_bytes, replica.estimated_ram_bytes)),
                _measured_cell(replica),
                replica.state,
            ],
            styles={6: STATE_STYLES[replica.state]},
            notes=_reason_notes(replica.reason, width),
            note_style=STATE_STYLES[replica.state],
        )
    # A model-level reason the replicas do not already say (e.g. "1 of 2 replicas placed").
    if model.reason and model.reason not in replica_reasons:
        table.add_notes(_reason_notes(model.reason, width))


# ----------------------------------------------------------------------------- cells


def _measured_cell(replica) -> str:
    """Measured memory, with measured/estimated when both are known (e.g. '412 MiB x0.97')."""
    measured = _total(replica.measured_gpu_bytes, replica.measured_ram_bytes)
    ratio = replica.measured_over_estimated
    return format_bytes(measured) + (f" x{ratio:.2f}" if ratio is not None else "")


def _counts_suffix(counts: Counter, order: tuple[str, ...]) -> str:
    parts = [f"{counts[state]} {state}" for state in order if counts[state]]
    return f"  ({', '.join(parts)})" if parts else ""


def _node_state_lines(node: NodeView, now: float) -> list[str]:
    if node.state == "gone" and node.reported_at is not None:
        return ["gone", f"seen {_age_text(now - node.reported_at)} ago"]
    return [node.state]


def _age_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def _cpu_text(node: NodeView) -> str:
    hw = node.hardware
    busy = _pct_text(hw.cpu_utilization_pct) if node.state == "alive" else None
    return f"{hw.cpu_cores} cores" + (f" {busy}" if busy else "")


def _ram_text(node: NodeView) -> str:
    hw = node.hardware
    used = None
    if node.state == "alive" and hw.ram_available_bytes is not None:
        used = int(hw.ram_total_bytes) - int(hw.ram_available_bytes)
    return _used_of_total(used, int(hw.ram_total_bytes))


def _gpu_lines(node: NodeView) -> list[str]:
    if not node.hardware.gpus:
        return ["none"]
    return [_gpu_text(gpu, live=node.state == "alive") for gpu in node.hardware.gpus]


def _gpu_text(gpu: GpuInfo, live: bool) -> str:
    used = _vram_used(gpu) if live else None
    text = f"{short_gpu_name(gpu.name)} {_used_of_total(used, int(gpu.vram_total_bytes))}"
    busy = _pct_text(gpu.utilization_pct) if live else None
    return text + (f" {busy}" if busy else "")


def _vram_used(gpu: GpuInfo) -> int | None:
    if gpu.vram_used_bytes is not None:
        return int(gpu.vram_used_bytes)
    if gpu.vram_free_bytes is not None:
        return int(gpu.vram_total_bytes) - int(gpu.vram_free_bytes)
    return None


def short_gpu_name(name: str) -> str:
    for prefix in GPU_NAME_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _used_of_total(used: int | None, total: int) -> str:
    used_text = "-" if used is None else f"{used / GIB:.1f}"
    return f"{used_text}/{total / GIB:.1f} GiB"


def _pct_text(pct: float | None) -> str | None:
    return None if pct is None else f"{pct:.0f}%"


def _models_on(node_name: str, models: list[ModelView]) -> list[str]:
    lines = []
    for model in models:
        for replica in model.replicas:
            if replica.node != node_name or replica.state not in HELD_STATES:
                continue
            lines.append(model.name if replica.state == "ready" else f"{model.name} ({replica.state})")
    return lines or ["-"]


def _short_replica_id(replica_id: str, model_name: str) -> str:
    """Drop the model name when the id repeats it ("qwen-14b-0" under qwen-14b shows as "0")."""
    if replica_id.startswith(model_name):
        rest = replica_id[len(model_name):].lstrip("-_/#:.")
        if rest:
            return rest
    return replica_id


def _total(gpu_bytes: int | None, ram_bytes: int | None) -> int | None:
    if gpu_bytes is None and ram_bytes is None:
        return None
    return (gpu_bytes or 0) + (ram_bytes or 0)


def _reason_notes(reason: str | None, width: int) -> list[str]:
    """A reason wrapped to `width`, in full: its own line breaks kept, no word cut."""
    if not reason:
        return []
    lines: list[str] = []
    first_indent = REASON_INDENT + "reason: "
    rest_indent = " " * len(first_indent)
    for i, paragraph in enumerate(reason.strip().splitlines()):
        lines += textwrap.wrap(
            paragraph,
            width=max(width, len(first_indent) + 20),
            initial_indent=first_indent if i == 0 else rest_indent,
            subsequent_indent=rest_indent,
            break_long_words=False,
            break_on_hyphens=False,
        ) or [rest_indent]
    return lines


# ----------------------------------------------------------------------------- table


class _Painter:
    def __init__(self, color: bool):
        self.color = color

    def __call__(self, style: str | None, text: str) -> str:
        if not self.color or not style or not text.strip():
            return text
        return f"\x1b[{_STYLE_CODES[style]}m{text}\x1b[0m"


@dataclass
class _Row:
    cells: list[list[str]]
    styles: dict[int, str]
    notes: list[str] = field(default_factory=list)
    note_style: str | None = None


class _Table:
    """Left-aligned columns sized to their widest line; multi-line cells; notes under rows."""

    def __init__(self, headers: list[str], right_aligned: set[int] | None = None):
        self.headers = headers
        self.right_aligned = right_aligned or set()
        self.rows: list[_Row] = []

    def add(
        self,
        cells: list[str | list[str]],
        styles: dict[int, str] | None = None,
        notes: list[str] | None = None,
        note_style: str | None = None,
    ) -> None:
        lines = [[c] if isinstance(c, str) else (list(c) or [""]) for c in cells]
        self.rows.append(_Row(lines, styles or {}, list(notes or []), note_style))

    def add_notes(self, notes: list[str]) -> None:
        if notes:
            self.rows[-1].notes += notes

    def render(self, painter: _Painter) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for col, cell in enumerate(row.cells):
                widths[col] = max(widths[col], *(len(line) for line in cell))
        out = [self._line(self.headers, widths, {i: "bold" for i in range(len(widths))}, painter)]
        for row in self.rows:
            for n in range(max(len(cell) for cell in row.cells)):
                texts = [cell[n] if n < len(cell) else "" for cell in row.cells]
                out.append(self._line(texts, widths, row.styles, painter))
            out += [painter(row.note_style, note) for note in row.notes]
        return "\n".join(out)

    def _line(self, texts: list[str], widths: list[int], styles: dict[int, str], painter: _Painter) -> str:
        padded = []
        for col, (text, w) in enumerate(zip(texts, widths, strict=True)):
            cell = text.rjust(w) if col in self.right_aligned else text.ljust(w)
            if col == len(widths) - 1:
                cell = cell.rstrip()  # no trailing blanks at the end of a line
            padded.append(painter(styles.get(col), cell) if text else cell)
        return COLUMN_GAP.join(padded).rstrip()
