"""One model across the GPUs of several machines over llama.cpp's RPC (issue 13, the plan).

Where no node holds a model whole on its GPU, its layers may be split across the GPUs of
two or more RPC-capable nodes: the main node runs the replica and its own GPU; each helper
node's GPU is reached through a `rpc-server` on that node. The split is taken only where its
predicted decode speed beats the best single-node option (a GPU/CPU split, or CPU only) by
SPLIT_MARGIN: a split that is only about as fast is not worth the LAN and a second machine.

Memory, per GPU: the weights and KV cache of its layers, a full compute buffer (every
device runs the graph of its layers at the batch size) and a CUDA context; the GPU that
holds the last layers also holds the output layer and the logits (llama.cpp puts the output
with the last layer). The token embedding stays in the main node's RAM, as with any offload.
Layers go in proportion to each GPU's room after its fixed part, the main node's GPU last
(it is the largest: it takes the output layer), the fewest GPUs that hold the model first
(every extra machine is another hop per token).

Speed: a token passes the layers in order, one GPU after another, so its time is the sum of
each GPU's weight reads at its memory bandwidth (GPU_DECODE_EFFICIENCY of the peak, as for a
single GPU) plus, for each helper GPU, RPC_ROUND_TRIPS_PER_TOKEN round trip on its link, the
activations there and back (n_embd float32 each way) and the RPC commands (bytes on the link,
CPU time at both ends). A node's link is what its hardware file declares, else its round
trip measured from the head (orchestrator/rpc_helpers.py), else a wired gigabit LAN
(DEFAULT_LINK).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from orchestrator.core.estimate import (
    CUDA_OVERHEAD_BYTES,
    EstimateOptions,
    graph_peak_bytes,
    kv_layer_bytes,
    output_buffer_bytes,
    output_rows,
)
from orchestrator.core.hardware import format_bytes
from orchestrator.core.model_shape import ModelShape

GPU_DECODE_EFFICIENCY = 0.7  # the same share of peak VRAM bandwidth as orchestrator/fit.py
SPLIT_MARGIN = 1.25  # a split must be predicted this much faster than the best single node
# Per helper GPU and token, as traced (strace of tests/bench/rpc_split_bench.py): about a dozen
# RPC commands go without waiting (the input, the graph: ~13 KB in all), and one waits: the
# helper's output fetched back. The per-token CPU work of those commands, both ends, is
# ~0.3 ms on the 2-core test machine (the bench's overhead beyond its transfers).
RPC_ROUND_TRIPS_PER_TOKEN = 1
RPC_COMMAND_BYTES_PER_TOKEN = 16 * 1024
RPC_COMMANDS_S_PER_TOKEN = 0.0003
GB = 1e9


@dataclass(frozen=True)
class Link:
    """A helper node's network path to the main node."""

    rtt_s: float
    bytes_per_s: float

    def seconds_per_token(self, n_embd: int) -> float:
        sent = 2 * n_embd * 4 + RPC_COMMAND_BYTES_PER_TOKEN  # the activations there and back, the commands
        return RPC_ROUND_TRIPS_PER_TOKEN * self.rtt_s + sent / self.bytes_per_s + RPC_COMMANDS_S_PER_TOKEN


DEFAULT_LINK = Link(rtt_s=0.0005, bytes_per_s=1e9 / 8)  # wired gigabit Ethernet


@dataclass(frozen=True)
class SplitGpu:
    """One GPU a split may use: its node, room (usable VRAM, after placement's margins) and speed."""

    node: str
    gpu_index: int
    gpu_name: str
    usable_vram_bytes: int
    bandwidth_gbps: float | None
    link: Link = DEFAULT_LINK  # to the main node (unused for the main node's own GPU)
    speed_factor: float = 1.0  # its node's calibration, as the single-node prediction has it


@dataclass(frozen=True)
class SplitPart:
    node: str
    gpu_index: int
    gpu_name: str
    first_layer: int
    layers: int  # blocks on this GPU (the output layer counted in `output`)
    gpu_bytes: int
    usable_vram_bytes: int
    output: bool = False  # holds the output layer (the last part)

    @property
    def offloaded(self) -> int:
        """Layers in llama.cpp's count (the output layer is one)."""
        return self.layers + int(self.output)


@dataclass(frozen=True)
class SplitPlan:
    parts: tuple[SplitPart, ...]  # in layer order; the main node's GPU last
    tokens_per_s: float | None  # None when a GPU's bandwidth is unknown
    network_s_per_token: float

    @property
    def main_node(self) -> str:
        return self.parts[-1].node

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(p.node for p in self.parts)

    def describe(self) -> str:
        main, helpers = self.parts[-1], self.parts[:-1]
        return describe_split(main.node, main.offloaded, [(p.node, p.offloaded) for p in helpers])


def describe_split(main_node: str, main_layers: int, helpers: Iterable[tuple[str, int]]) -> str:
    """`desktop 45 layers GPU + laptop-1 20 layers GPU (RPC)`: the main node first, then each
    helper (node, offloaded layers)."""
    return " + ".join([f"{main_node} {main_layers} layers GPU"]
                      + [f"{node} {layers} layers GPU (RPC)" for node, layers in helpers])


def plan_split(shape: ModelShape, opts: EstimateOptions, gpus: Sequence[SplitGpu]) -> SplitPlan | str:
    """The split of `shape` across the fewest of `gpus` that hold it (module docstring), or
    why none does. One GPU per node: llama.cpp's RPC server serves a node's devices, and the
    planner keeps to one card a machine, as placement does for a single node."""
    best_per_node: dict[str, SplitGpu] = {}
    for g in gpus:
        if g.node not in best_per_node or g.usable_vram_bytes > best_per_node[g.node].usable_vram_bytes:
            best_per_node[g.node] = g
    ordered = sorted(best_per_node.values(), key=lambda g: (-g.usable_vram_bytes, g.node))
    if len(ordered) < 2:
        return "a split needs the GPUs of two or more RPC-capable nodes"
    costs = [shape.layer_weight_bytes[il] + kv_layer_bytes(shape, il, opts) for il in range(shape.n_layers)]
    fixed = graph_peak_bytes(shape, opts, output_rows(shape, opts)[0]) + CUDA_OVERHEAD_BYTES
    output = shape.output_bytes + output_buffer_bytes(shape, opts)
    for count in range(2, len(ordered) + 1):
        chosen = ordered[:count]
        main, helpers = chosen[0], chosen[1:]
        devices = [*helpers, main]  # layer order: the helpers' layers first, the main GPU's last
        parts = _fill(costs, fixed, output, devices) or _fill(costs, fixed, output, devices, proportional=False)
        if parts is not None:
            return SplitPlan(tuple(parts), _tokens_per_s(shape, parts, devices), _network_s(shape, helpers))
    room = sum(g.usable_vram_bytes for g in ordered)
    need = sum(costs) + output + fixed * len(ordered)
    return (f"the {len(ordered)} RPC-capable GPUs together have {format_bytes(room)} usable VRAM; split across "
            f"them the model needs {format_bytes(need)}")


def _fill(costs: list[int], fixed: int, output: int, devices: list[SplitGpu],
          proportional: bool = True) -> list[SplitPart] | None:
    """Contiguous layers for each device in proportion to its room after its fixed part (else
    as many as each holds, in order), every part within its room; None when they do not all fit."""
    rooms = [d.usable_vram_bytes - fixed - (output if i == len(devices) - 1 else 0) for i, d in enumerate(devices)]
    if any(r <= 0 for r in rooms) or sum(costs) > sum(rooms):
        return None
    total, share = sum(costs), sum(rooms)
    parts, layer = [], 0
    for i, (device, room) in enumerate(zip(devices, rooms)):
        last = i == len(devices) - 1
        target = total * room / share
        used, first = 0, layer
        while layer < len(costs) and used + costs[layer] <= room and (last or not proportional or used + costs[layer] / 2 <= target):
            used += costs[layer]
            layer += 1
        own = fixed + (output if last else 0)
        parts.append(SplitPart(device.node, device.gpu_index, device.gpu_name, first, layer - first, used + own,
                               device.usable_vram_bytes, output=last))
    return parts if layer == len(costs) else None


def _tokens_per_s(shape: ModelShape, parts: list[SplitPart], devices: list[SplitGpu]) -> float | None:
    seconds = _network_s(shape, devices[:-1])
    for part, device in zip(parts, devices):
        if not device.bandwidth_gbps:
            return None
        read = sum(shape.layer_weight_bytes[part.first_layer:part.first_layer + part.layers])
        read += shape.output_bytes if part.output else 0
        if shape.n_expert and shape.n_expert_used:  # MoE: only the routed experts are read
            read = int(read * shape.n_expert_used / shape.n_expert)
        seconds += read / (device.bandwidth_gbps * GB * GPU_DECODE_EFFICIENCY * device.speed_factor)
    return 1.0 / seconds


def _network_s(shape: ModelShape, helpers: Sequence[SplitGpu]) -> float:
    return sum(h.link.seconds_per_token(shape.n_embd) for h in helpers)


def split_wins(split: SplitPlan, single_tokens_per_s: float | None, single_runs: bool = False) -> tuple[bool, str]:
    """Whether to take the split over the best single-node option (`single_runs`: some node
    runs the model alone, its speed known or not), and why, in numbers."""
    if split.tokens_per_s is None:
        return False, "a GPU's memory bandwidth is unknown: no speed to compare"
    if not single_tokens_per_s and single_runs:
        return False, "a single node runs it, at a speed not known: no speed to compare"
    if not single_tokens_per_s:
        return True, f"~{split.tokens_per_s:.1f} tokens/s split; no single node runs it"
    ratio = split.tokens_per_s / single_tokens_per_s
    verdict = ratio >= SPLIT_MARGIN
    word = "taken" if verdict else f"not taken (under {SPLIT_MARGIN:.2f}x)"
    return verdict, (f"~{split.tokens_per_s:.1f} tokens/s split vs ~{single_tokens_per_s:.1f} on the best single "
                     f"node ({ratio:.2f}x): {word}")


def split_key(nodes: Iterable[str]) -> str:
    """One name per set of machines, for the speed a split across them measured: 'desktop+laptop-1'."""
    return "+".join(sorted(nodes))


def decide_split(shape: ModelShape, opts: EstimateOptions, gpus: Sequence[SplitGpu], single_tokens_per_s: float | None,
                 single_runs: bool, measured: Mapping[str, float] | None = None) -> tuple[SplitPlan | str, bool, str]:
    """The split of `shape` across `gpus` (or why there is none), whether it beats the best
    single-node option, and why. `measured`: per split_key, measured / predicted speed of a
    split across those machines before (the calibration learns splits too)."""
    split = plan_split(shape, opts, gpus)
    if isinstance(split, str):
        return split, False, split
    factor = (measured or {}).get(split_key(split.nodes))
    if factor and split.tokens_per_s is not None:
        split = replace(split, tokens_per_s=split.tokens_per_s * factor)
    taken, why = split_wins(split, single_tokens_per_s, single_runs)
    return split, taken, why
