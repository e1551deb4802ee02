"""`homefleet fit` as a value: a model's memory breakdown and, per node, where it fits.

Pure: takes a ModelShape, EstimateOptions and NodeHardware values, returns a FitReport;
`render_fit` and `fit_to_dict` turn it into text or JSON. Margins are placement's
(orchestrator.core.placement.DEFAULT_MARGINS): usable VRAM = free - max(256 MiB, 5% of
total), usable RAM = available - max(1 GiB, 5% of total), so `fit` and `plan` agree.

Slots: a replica serves several requests at once, each slot with the full context
(EstimateOptions.n_slots). `fit_report` gives each node the most slots, up to
`max_slots` (placement's default of 4), that keep the verdict that opts.n_slots slots get
there (whole on the GPU stays whole, a split a split, CPU only CPU only), as placement
picks them for a model that leaves `parallel` unset; `max_slots=opts.n_slots` fixes them.

Decode speed: generating a token reads every weight it uses once (the blocks and the
output layer; the embedding only one row), the GPU part at the card's memory bandwidth and
the CPU part at the RAM bandwidth, each at an efficiency below the peak; a per-node factor
calibrates a machine against a measured figure.

Across machines: where no node holds the model whole on its GPU and two or more nodes have
llama.cpp's RPC (`rpc`), the report also plans a split of its layers across their GPUs
(orchestrator/core/rpc_split.py) and says whether it beats the best single node, and by how
much, in tokens/s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from orchestrator.core.estimate import EstimateOptions, MemoryEstimate, estimate, need_function, slot_needs
from orchestrator.core.hardware import GpuInfo, NodeHardware, format_bytes
from orchestrator.core.model_shape import ModelShape
from orchestrator.core.placement import DEFAULT_MARGINS, DEFAULT_MAX_SLOTS, Margins
from orchestrator.core.rpc_split import DEFAULT_LINK, Link, SplitGpu, SplitPlan, decide_split

GPU_DECODE_EFFICIENCY = 0.7  # share of peak VRAM bandwidth llama.cpp's decode reaches
CPU_DECODE_EFFICIENCY = 0.55  # share of peak RAM bandwidth (dual-channel DDR4/DDR5)
GB = 1e9

Verdict = Literal["gpu", "split", "cpu", "none"]


@dataclass(frozen=True)
class NodeFit:
    node: str
    verdict: Verdict
    n_gpu_layers: int  # of n_offloadable (blocks + output layer)
    n_offloadable: int
    gpu_name: str | None
    gpu_bytes: int  # needed on that GPU
    ram_bytes: int  # needed in host RAM (resident)
    vram_usable_bytes: int
    ram_usable_bytes: int
    tokens_per_s: float | None
    summary: str
    n_slots: int = 1  # requests served at once, each with the full context


@dataclass(frozen=True)
class FitReport:
    model: str
    source: str  # the GGUF path, or "catalog"
    shape: ModelShape
    options: EstimateOptions
    whole_gpu: MemoryEstimate
    cpu_only: MemoryEstimate
    nodes: tuple[NodeFit, ...]
    max_slots: int = 1  # the most slots a node was given (per node: NodeFit.n_slots)
    split: SplitPlan | str | None = None  # across RPC-capable nodes' GPUs, or why not; None: not considered
    split_taken: bool = False
    split_why: str | None = None


def usable_vram_bytes(gpu: GpuInfo, margins: Margins = DEFAULT_MARGINS) -> int:
    return gpu.vram_free - margins.vram_bytes(int(gpu.vram_total_bytes))


def usable_ram_bytes(node: NodeHardware, margins: Margins = DEFAULT_MARGINS) -> int:
    return node.ram_available - margins.ram_bytes(int(node.ram_total_bytes))


def weight_bytes_read_per_token(shape: ModelShape, n_gpu_layers: int) -> tuple[int, int]:
    """(GPU, CPU) weight bytes one decoded token reads with k offloadable layers on the GPU."""
    n = shape.n_layers
    first_gpu = n + 1 - n_gpu_layers
    gpu = sum(shape.layer_weight_bytes[first_gpu:]) + (shape.output_bytes if n_gpu_layers >= 1 else 0)
    cpu = sum(shape.layer_weight_bytes[:first_gpu]) + (0 if n_gpu_layers >= 1 else shape.output_bytes)
    if shape.n_expert and shape.n_expert_used:  # MoE: only the routed experts are read
        scale = shape.n_expert_used / shape.n_expert
        gpu, cpu = int(gpu * scale), int(cpu * scale)
    return gpu, cpu


def decode_tokens_per_s(
    shape: ModelShape, n_gpu_layers: int, node: NodeHardware, gpu: GpuInfo | None, calibration: float = 1.0
) -> float | None:
    """Predicted decode speed from memory bandwidth; None when a needed bandwidth is unknown."""
    gpu_read, cpu_read = weight_bytes_read_per_token(shape, n_gpu_layers if gpu else 0)
    seconds = 0.0
    if gpu_read:
        if gpu is None or not gpu.memory_bandwidth_gbps:
            return None
        seconds += gpu_read / (gpu.memory_bandwidth_gbps * GB * GPU_DECODE_EFFICIENCY)
    if cpu_read:
        if not node.ram_bandwidth_gbps:
            return None
        seconds += cpu_read / (node.ram_bandwidth_gbps * GB * CPU_DECODE_EFFICIENCY)
    return calibration / seconds if seconds else None


def _most_gpu_layers(need, n_offloadable: int, vram: int, ram: int) -> int:
    """Largest k in 1..n_offloadable whose need fits VRAM and RAM; 0 if none does.

    GPU need grows with k and host need shrinks with k, so the largest k that fits the VRAM
    is the best candidate: if the RAM cannot hold the rest at that k, no smaller k helps.
    """
    lo, hi = 0, n_offloadable
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid).gpu_bytes <= vram:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo and need(lo).ram_bytes <= ram else 0


def fit_node(
    shape: ModelShape, opts: EstimateOptions, node: NodeHardware,
    margins: Margins = DEFAULT_MARGINS, calibration: float = 1.0, need=None, max_slots: int | None = None,
    needs=None,
) -> NodeFit:
    """Where `shape` fits on `node`: whole on its best GPU, split, CPU only, or not at all.

    With `max_slots` above opts.n_slots: the most slots, down from max_slots, that get the
    same verdict as opts.n_slots (module docstring); `needs(s)` gives need(k) at s slots."""
    base = _fit_at(shape, opts, node, margins, calibration, need or need_function(shape, opts))
    if max_slots is None or max_slots <= opts.n_slots or base.verdict == "none":
        return base
    needs = needs or slot_needs(shape, opts)
    for n_slots in range(max_slots, opts.n_slots, -1):
        more = _fit_at(shape, replace(opts, n_slots=n_slots), node, margins, calibration, needs(n_slots))
        if more.verdict == base.verdict:
            return more
    return base


def _slots(n: int) -> str:
    return f"{n} slot" if n == 1 else f"{n} slots"


def _fit_at(
    shape: ModelShape, opts: EstimateOptions, node: NodeHardware, margins: Margins, calibration: float, need,
) -> NodeFit:
    n_off = shape.n_layers + 1
    ram = usable_ram_bytes(node, margins)
    best: tuple[int, GpuInfo, int] | None = None
    for g in node.gpus:
        vram = usable_vram_bytes(g, margins)
        k = _most_gpu_layers(need, n_off, vram, ram)
        if k and (best is None or k > best[0] or (k == best[0] and vram > best[2])):
            best = (k, g, vram)
    top_vram = max((usable_vram_bytes(g, margins) for g in node.gpus), default=0)
    slots = _slots(opts.n_slots)

    def result(verdict: Verdict, k: int, g: GpuInfo | None, summary: str) -> NodeFit:
        n = need(k)
        speed = decode_tokens_per_s(shape, k, node, g, calibration) if verdict != "none" else None
        vram = usable_vram_bytes(g, margins) if g else top_vram
        return NodeFit(node.name, verdict, k, n_off, g.name if g else None, n.gpu_bytes if g else 0,
                       n.ram_bytes, vram, ram, speed, summary, opts.n_slots)

    if best is not None:
        k, g, vram = best
        n = need(k)
        room = f"{format_bytes(n.gpu_bytes)} of {format_bytes(vram)} usable VRAM, {format_bytes(n.ram_bytes)} RAM"
        if k == n_off:
            return result("gpu", k, g, f"whole on GPU ({g.name}), {slots}: {room}")
        return result("split", k, g, f"{k} of {n_off} layers on GPU ({g.name}), {slots}: {room}")
    cpu = need(0)
    if cpu.ram_bytes <= ram:
        why = f"; all layers need {format_bytes(need(n_off).gpu_bytes)} VRAM" if node.gpus else ""
        return result("cpu", 0, None,
                      f"CPU only, {slots}: {format_bytes(cpu.ram_bytes)} of {format_bytes(ram)} usable RAM{why}")
    parts = [f"needs {format_bytes(cpu.ram_bytes)} RAM CPU-only, {format_bytes(ram)} usable"]
    if node.gpus:
        parts.insert(0, f"needs {format_bytes(need(n_off).gpu_bytes)} VRAM for all {n_off} layers, "
                        f"{format_bytes(top_vram)} usable")
    at = f" ({slots})" if opts.n_slots > 1 else ""
    return result("none", 0, None, f"does not fit{at}: " + "; ".join(parts))


def fit_report(
    shape: ModelShape, opts: EstimateOptions, nodes: Sequence[NodeHardware], source: str = "catalog",
    margins: Margins = DEFAULT_MARGINS, calibrations: Mapping[str, float] | None = None,
    max_slots: int = DEFAULT_MAX_SLOTS,
) -> FitReport:
    """Breakdown at opts (opts.n_slots slots) and, per node, the fit with the most slots up
    to `max_slots` that keep the verdict (pass max_slots=opts.n_slots for exactly those)."""
    needs = slot_needs(shape, opts)
    fits = tuple(
        fit_node(shape, opts, n, margins, (calibrations or {}).get(n.name, 1.0), needs(opts.n_slots), max_slots, needs)
        for n in nodes
    )
    split, taken, why = _rpc_split(shape, opts, nodes, fits, margins, calibrations or {}, needs(opts.n_slots))
    return FitReport(
        model=shape.name, source=source, shape=shape, options=opts,
        whole_gpu=estimate(shape, shape.n_layers + 1, opts, gpu=True),
        cpu_only=estimate(shape, 0, opts, gpu=False), nodes=fits, max_slots=max(max_slots, opts.n_slots),
        split=split, split_taken=taken, split_why=why,
    )


def node_link(node: NodeHardware) -> Link:
    """A node's path to the head, as measured or declared; a wired gigabit LAN otherwise."""
    return Link(rtt_s=node.link_rtt_ms / 1000 if node.link_rtt_ms else DEFAULT_LINK.rtt_s,
                bytes_per_s=node.link_mbps * 1e6 / 8 if node.link_mbps else DEFAULT_LINK.bytes_per_s)


def split_gpus(nodes: Sequence[NodeHardware], margins: Margins = DEFAULT_MARGINS,
               calibrations: Mapping[str, float] | None = None) -> list[SplitGpu]:
    return [SplitGpu(n.name, g.index, g.name, usable_vram_bytes(g, margins), g.memory_bandwidth_gbps, node_link(n),
                     (calibrations or {}).get(n.name, 1.0))
            for n in nodes if n.rpc for g in n.gpus]


def _rpc_split(shape: ModelShape, opts: EstimateOptions, nodes: Sequence[NodeHardware], fits: Sequence[NodeFit],
               margins: Margins, calibrations: Mapping[str, float], need) -> tuple[SplitPlan | str | None, bool, str | None]:
    """A split across machines where no node holds the model whole on its GPU (None: not
    considered), whether it is taken over the best single node, and why. Both at opts.n_slots
    slots: more slots leave a single node fewer GPU layers (and less speed)."""
    if any(f.verdict == "gpu" for f in fits) or sum(1 for n in nodes if n.rpc and n.gpus) < 2:
        return None, False, None
    alone = [_fit_at(shape, opts, n, margins, calibrations.get(n.name, 1.0), need) for n in nodes]
    single = max((f.tokens_per_s for f in alone if f.verdict != "none" and f.tokens_per_s), default=None)
    return decide_split(shape, opts, split_gpus(nodes, margins, calibrations), single,
                        single_runs=any(f.verdict != "none" for f in alone))


def host_need_bytes(e: MemoryEstimate) -> int:
    """Host RAM that stays resident: repacked weights replace their mapped pages."""
    return e.ram_bytes + e.mmap_bytes - e.breakdown.weights_repacked_bytes


def _breakdown_rows(r: FitReport) -> list[tuple[str, int, int]]:
    g, c = r.whole_gpu.breakdown, r.cpu_only.breakdown
    return [
        ("weights", g.weights_gpu_bytes + g.weights_cpu_bytes, c.weights_cpu_bytes - c.weights_repacked_bytes),
        ("KV cache", g.kv_gpu_bytes + g.kv_cpu_bytes, c.kv_cpu_bytes),
        ("compute buffers", g.compute_gpu_bytes + g.compute_cpu_bytes, c.compute_cpu_bytes),
        ("overhead", g.overhead_gpu_bytes + g.overhead_cpu_bytes, c.overhead_cpu_bytes),
    ]


def _kv_per_slot(r: FitReport) -> int:
    b = r.whole_gpu.breakdown
    return (b.kv_gpu_bytes + b.kv_cpu_bytes) // r.options.n_slots


def render_fit(r: FitReport) -> str:
    s, o = r.shape, r.options
    lines = [
        f"{r.model} ({s.architecture}, {s.weight_type}, {s.n_layers} layers + output, "
        f"{s.weight_bytes / GB:.2f} GB of weights) from {r.source}",
        f"context {r.whole_gpu.n_ctx} per slot, KV {o.kv_type}, flash attention {'on' if o.flash_attn else 'off'}; "
        f"breakdown for {_slots(o.n_slots)}" + (
            f", nodes with up to {r.max_slots} (each slot +{format_bytes(_kv_per_slot(r))} KV)"
            if r.max_slots > o.n_slots else ""),
        "",
        f"  {'':18}{'whole on GPU':>14}{'CPU only':>14}",
    ]
    for name, gpu_total, cpu_total in _breakdown_rows(r):
        lines.append(f"  {name:18}{format_bytes(gpu_total):>14}{format_bytes(cpu_total):>14}")
    lines.append(f"  {'= GPU':18}{format_bytes(r.whole_gpu.gpu_bytes):>14}{'-':>14}")
    lines.append(f"  {'= host RAM':18}{format_bytes(host_need_bytes(r.whole_gpu)):>14}"
                 f"{format_bytes(host_need_bytes(r.cpu_only)):>14}")
    lines.append("")
    width = max((len(n.node) for n in r.nodes), default=4) + 2
    for n in r.nodes:
        speed = f"~{n.tokens_per_s:.0f} tokens/s" if n.tokens_per_s else ""
        lines.append(f"  {n.node:{width}}{n.summary}" + (f"  [{speed}]" if speed else ""))
    if isinstance(r.split, SplitPlan):
        lines += ["", f"  across machines (llama.cpp RPC): {r.split.describe()}",
                  "    " + ", ".join(f"{p.node} {format_bytes(p.gpu_bytes)} of {format_bytes(p.usable_vram_bytes)} "
                                     f"usable VRAM" for p in (r.split.parts[-1], *r.split.parts[:-1])),
                  f"    {r.split_why}"]
    elif r.split is not None:
        lines += ["", f"  across machines (llama.cpp RPC): no split: {r.split}"]
    return "\n".join(lines)


def fit_to_dict(r: FitReport) -> dict:
    def est(e: MemoryEstimate) -> dict:
        return {"gpu_bytes": e.gpu_bytes, "ram_bytes": e.ram_bytes, "mmap_bytes": e.mmap_bytes,
                "n_gpu_layers": e.n_gpu_layers, "breakdown": vars(e.breakdown) | {}}

    s = r.shape
    return {
        "model": r.model, "source": r.source, "architecture": s.architecture, "weight_type": s.weight_type,
        "n_layers": s.n_layers, "weight_bytes": s.weight_bytes, "n_ctx": r.whole_gpu.n_ctx,
        "n_slots": r.options.n_slots,
        "kv_type": r.options.kv_type, "flash_attn": r.options.flash_attn,
        "whole_gpu": est(r.whole_gpu), "cpu_only": est(r.cpu_only),
        "nodes": [vars(n) | {} for n in r.nodes],
        "rpc_split": _split_dict(r),
    }


def _split_dict(r: FitReport) -> dict | None:
    if r.split is None:
        return None
    if isinstance(r.split, str):
        return {"taken": False, "why": r.split, "parts": []}
    return {"taken": r.split_taken, "why": r.split_why, "describe": r.split.describe(),
            "tokens_per_s": r.split.tokens_per_s, "network_ms_per_token": r.split.network_s_per_token * 1000,
            "parts": [vars(p) | {} for p in r.split.parts]}


def calibrate_speed(
    node: NodeHardware, shape: ModelShape, n_gpu_layers: int, gpu: GpuInfo | None, measured_tokens_per_s: float
) -> tuple[NodeHardware, float]:
    """Fold a measured decode speed into a node: (node, factor) for later predictions.

    With known bandwidths the factor is measured/predicted. A CPU-only run on a machine whose
    RAM bandwidth is unknown (a probed node) instead yields the effective bandwidth itself.
    """
    predicted = decode_tokens_per_s(shape, n_gpu_layers, node, gpu)
    if predicted:
        return node, measured_tokens_per_s / predicted
    gpu_read, cpu_read = weight_bytes_read_per_token(shape, n_gpu_layers if gpu else 0)
    if gpu_read == 0 and cpu_read > 0:
        bandwidth = cpu_read * measured_tokens_per_s / (GB * CPU_DECODE_EFFICIENCY)
        return node.model_copy(update={"ram_bandwidth_gbps": round(bandwidth, 2)}), 1.0
    return node, 1.0
