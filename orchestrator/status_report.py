"""`homefleet status` as text: a NODES table and a MODELS table from one ClusterView.

Pure: takes the snapshot the gateway serves at `GET /api/cluster` and returns a string.
Cells may span several lines (one GPU or one model a line); reasons for pending or failed
models, and the progress of a model file coming to its node (copying from a peer,
downloading from a URL), are printed in full, wrapped under their row, never cut to fit a
column.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.cluster_view import ClusterView, ModelView, NodeView
from orchestrator.core.hardware import GIB, MIB, GpuInfo, format_bytes, format_duration
from orchestrator.core.store_types import TransferProgress

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
    "draining": "yellow",
    "gone": "red",
    "ready": "green",
    "loading": "cyan",
    "copying": "cyan",
    "downloading": "cyan",
    "pending": "yellow",
    "waking": "cyan",
    "failed": "red",
    "stopped": "dim",
    "not_loaded": "dim",
    "unloading": "cyan",
}
# Replicas whose model file is still on its way to their node.
FETCHING_STATES = ("copying", "downloading")
# Model names a node lists: replicas in these states live (or are about to) on it.
HELD_STATES = ("ready", "loading", *FETCHING_STATES, "pending")
# Order of the state counts after the MODELS title.
MODEL_STATE_ORDER = ("ready", "waking", "loading", *FETCHING_STATES, "unloading", "not_loaded", "pending", "failed",
                     "stopped")
# Prefixes dropped from GPU marketing names: "NVIDIA GeForce RTX 4070 Ti" -> "RTX 4070 Ti".
GPU_NAME_PREFIXES = ("NVIDIA ", "GeForce ")


# `status --watch` on a terminal: cursor home, each line cleared to its end as it is written
# over the last frame, the rest of the screen cleared below; so the frame never flickers blank.
HOME, CLEAR_LINE_END, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def watch_frame(text: str, title: str, in_place: bool) -> str:
    """One frame of `status --watch`: a title line, a blank line and `text`.

    in_place (a terminal): drawn over the previous frame. Otherwise (a pipe, a file): plain
    text, no escape codes, frames one after another with a blank line between them."""
    body = f"{title}\n\n{text.rstrip(chr(10))}\n"
    if not in_place:
        return body + "\n"
    return HOME + "".join(line + CLEAR_LINE_END + "\n" for line in body.splitlines()) + CLEAR_BELOW


def render_status(view: ClusterView, color: bool = False, width: int = DEFAULT_WIDTH) -> str:
    """Both tables, separated by a blank line; `width` only governs how reasons wrap."""
    painter = _Painter(color)
    return "\n\n".join([_nodes_section(view, painter), _models_section(view, painter, width)]) + "\n"


# ----------------------------------------------------------------------------- sections


def _nodes_section(view: ClusterView, painter: _Painter) -> str:
    title = painter("bold", "NODES") + _counts_suffix(Counter(n.state for n in view.nodes), ("alive", "draining", "gone"))
    if not view.nodes:
        return title + "\n" + painter("dim", "no node has joined yet: run `homefleet join HEAD:6379` on each machine")
    table = _Table(["NAME", "ADDRESS", "STATE", "CPU", "RAM", "GPU", "DISK FREE", "MODELS"])
    for node in sorted(view.nodes, key=lambda n: (not n.is_head, n.name)):
        table.add(
            [
                node.name + (" (head)" if node.is_head else ""),
                node.address,
                _node_state_lines(node, view.generated_at),
                _cpu_text(node),
                _ram_text(node),
                _gpu_lines(node),
                _disk_text(node),
                _models_on(node.name, view.models),
            ],
            styles={2: STATE_STYLES[node.state]},
        )
    return title + "\n" + table.render(painter)


def _models_section(view: ClusterView, painter: _Painter, width: int) -> str:
    states = Counter(m.state for m in view.models)
    title = painter("bold", "MODELS") + _counts_suffix(states, MODEL_STATE_ORDER)
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
    shows_progress = False
    for i, replica in enumerate(model.replicas):
        progress = _progress_notes(replica.state, replica.transfer, width)
        shows_progress = shows_progress or bool(progress)
        table.add(
            [
                model.name if i == 0 else "",
                _short_replica_id(replica.replica_id, model.name),
                replica.node or "-",
                replica.processor,
                format_bytes(_total(replica.estimated_gpu_bytes, replica.estimated_ram_bytes)),
                _measured_cell(replica),
                _state_cell(replica.state, replica.transfer),
            ],
            styles={6: STATE_STYLES[replica.state]},
            notes=progress + _reason_notes(replica.reason, width) + _split_notes(replica, width),
            note_style=STATE_STYLES[replica.state],
        )
    # A model-level reason the replicas do not already say (e.g. "1 of 2 replicas placed"); while
    # its file travels the model's reason only repeats a replica's progress, already printed.
    repeats_progress = shows_progress and model.state in FETCHING_STATES
    if model.reason and model.reason not in replica_reasons and not repeats_progress:
        table.add_notes(_reason_notes(model.reason, width))
    if model.state == "ready" and model.unloads_in_s is not None:  # like `ollama ps`
        table.add_notes([REASON_INDENT + f"unloads in {format_duration(model.unloads_in_s)} if idle"])



# ----------------------------------------------------------------------------- cells


def _split_notes(replica, width: int) -> list[str]:
    """A split across machines (llama.cpp RPC) weighed for the replica: both speeds, the verdict."""
    if not replica.split_why or replica.state not in ("ready", "loading"):
        return []
    return _wrapped(f"split: {replica.split_why}", width)


def _measured_cell(replica) -> str:
    """Measured memory, with measured/estimated when both are known (e.g. '412 MiB x0.97')."""
    measured = _total(replica.measured_gpu_bytes, replica.measured_ram_bytes)
    ratio = replica.measured_over_estimated
    return format_bytes(measured) + (f" x{ratio:.2f}" if ratio is not None else "")


def _state_cell(state: str, transfer: TransferProgress | None) -> str:
    """'copying 45%' while the file travels (whole percents, so 100% only once it is all there)."""
    if state in FETCHING_STATES and transfer is not None and transfer.percent is not None:
        return f"{state} {int(transfer.percent)}%"
    return state


def _progress_notes(state: str, transfer: TransferProgress | None, width: int) -> list[str]:
    """'copying: 45% of 241 MiB at 64 MiB/s, about 2s left, from desktop', wrapped like reasons.

    The source comes last: a URL is long and, never cut, wraps onto a line of its own."""
    if state not in FETCHING_STATES or transfer is None:
        return []
    source = f", from {transfer.source}" if transfer.source else ""
    return _wrapped(f"{state}: {_progress_text(transfer)}{source}", width)


def _progress_text(t: TransferProgress) -> str:
    total = format_bytes(t.total_bytes) if t.total_bytes else None
    if t.state == "queued":
        text = "queued" + (f", {total}" if total else "")
    elif t.state == "verifying":
        text = "verifying sha256" + (f" of {total}" if total else "")
    elif t.percent is not None:
        text = f"{int(t.percent)}% of {total}"
    else:
        text = f"{format_bytes(t.bytes_done)} so far"
    if t.state in ("copying", "downloading"):
        if t.rate_bytes_per_s:
            text += f" at {_rate_text(t.rate_bytes_per_s)}"
        if t.eta_s is not None:
            text += f", about {format_duration(t.eta_s)} left"
    if t.attempt > 1:
        text += f" (attempt {t.attempt})"
    return text


def _rate_text(bytes_per_s: float) -> str:
    if bytes_per_s < MIB:
        return f"{bytes_per_s / 1024:.0f} KiB/s"
    return f"{format_bytes(bytes_per_s)}/s"


def _counts_suffix(counts: Counter, order: tuple[str, ...]) -> str:
    parts = [f"{counts[state]} {state}" for state in order if counts[state]]
    return f"  ({', '.join(parts)})" if parts else ""


def _node_state_lines(node: NodeView, now: float) -> list[str]:
    if node.state == "gone" and node.reported_at is not None:
        return ["gone", f"seen {format_duration(now - node.reported_at)} ago"]
    return [node.state]



def _cpu_text(node: NodeView) -> str:
    hw = node.hardware
    busy = _pct_text(hw.cpu_utilization_pct) if node.state != "gone" else None
    return f"{hw.cpu_cores} cores" + (f" {busy}" if busy else "")


def _ram_text(node: NodeView) -> str:
    hw = node.hardware
    used = None
    if node.state != "gone" and hw.ram_available_bytes is not None:
        used = int(hw.ram_total_bytes) - int(hw.ram_available_bytes)
    return _used_of_total(used, int(hw.ram_total_bytes))


def _gpu_lines(node: NodeView) -> list[str]:
    rpc = ["rpc"] if node.hardware.rpc else []  # its engine can take part in a split across machines
    if not node.hardware.gpus:
        return ["none", *rpc]
    return [_gpu_text(gpu, live=node.state != "gone") for gpu in node.hardware.gpus] + rpc


def _gpu_text(gpu: GpuInfo, live: bool) -> str:
    used = _vram_used(gpu) if live else None
    text = f"{short_gpu_name(gpu.name)} {_used_of_total(used, int(gpu.vram_total_bytes))}"
    busy = _pct_text(gpu.utilization_pct) if live else None
    return text + (f" {busy}" if busy else "")


def _disk_text(node: NodeView) -> str:
    """Free disk of the node's model store, as last reported; '-' when unknown or the node is gone."""
    store = node.store
    if node.state == "gone" or store is None or store.disk_free_bytes is None:
        return "-"
    return format_bytes(store.disk_free_bytes)


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
            if replica.state not in HELD_STATES:
                continue
            if replica.node == node_name:
                lines.append(model.name if replica.state == "ready" else f"{model.name} ({replica.state})")
            elif any(h.node == node_name for h in replica.helpers):  # its GPU serves part of a split
                lines.append(f"{model.name} (RPC helper)")
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
    return _wrapped("reason: " + reason.strip(), width)


def _wrapped(text: str, width: int) -> list[str]:
    """A note under a row: indented, wrapped to `width` under its first word, line breaks kept."""
    label, _, _ = text.partition(" ")
    first_indent = REASON_INDENT
    rest_indent = " " * (len(REASON_INDENT) + len(label) + 1)
    lines: list[str] = []
    for i, paragraph in enumerate(text.splitlines()):
        lines += textwrap.wrap(
            paragraph,
            width=max(width, len(rest_indent) + 20),
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
