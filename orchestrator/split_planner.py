"""The `splitter` placement takes (orchestrator/core/placement.py): for a replica that no GPU
holds whole, the split of its layers across the GPUs of RPC-capable nodes
(orchestrator/core/rpc_split.py) and whether its predicted speed beats the best
single-node option, in the same numbers `homefleet fit` and `plan` print.

Pure: built each tick from what the controller knows (shapes, hardware, each node's speed
calibration, what splits measured before, splits refused of late) and handed to `place`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from orchestrator.core.estimate import EstimateOptions
from orchestrator.core.hardware import NodeHardware
from orchestrator.core.model_shape import ModelShape
from orchestrator.core.placement import GpuPart, GpuRoom, ModelDemand, SingleOption, SplitOffer, Splitter
from orchestrator.core.rpc_split import SplitGpu, SplitPlan, decide_split
from orchestrator.fit import decode_tokens_per_s, node_link

OptionsFor = Callable[[str, int], EstimateOptions]  # (model, slots) -> its estimate options


def make_splitter(
    shapes: Mapping[str, ModelShape],
    options_for: OptionsFor,
    hardware: Mapping[str, NodeHardware],
    speed_factors: Mapping[str, float] | None = None,
    split_factors: Mapping[str, float] | None = None,
    refused: Mapping[str, str] | None = None,
    memory_factors: Mapping[str, float] | None = None,
) -> Splitter:
    """`speed_factors`: per node, measured / predicted single-node decode speed;
    `split_factors`: per split_key, measured / predicted speed of a split across those nodes;
    `refused`: model -> why its split may not be used now (a helper's RPC server failed);
    `memory_factors`: model -> llama.cpp's dry run over the analytic estimate, which scales
    each part's memory as it scales the single-node demands."""
    speed_factors, split_factors, refused = speed_factors or {}, split_factors or {}, refused or {}
    memory_factors = memory_factors or {}

    def splitter(demand: ModelDemand, rooms: Sequence[GpuRoom], single: SingleOption | None) -> SplitOffer | str:
        if demand.model in refused:
            return f"split not used: {refused[demand.model]}"
        shape = shapes.get(demand.model)
        if shape is None:
            return "split not weighed: the model's shape is not known"
        opts = options_for(demand.model, demand.slots)
        scale = memory_factors.get(demand.model, 1.0)  # planned at the estimate's scale, booked at llama.cpp's
        gpus = [_split_gpu(replace(room, usable_bytes=int(room.usable_bytes / scale)), hardware[room.node],
                           speed_factors.get(room.node, 1.0))
                for room in rooms if room.node in hardware]
        plan, taken, why = decide_split(shape, opts, gpus, _single_speed(shape, single, hardware, speed_factors),
                                        single_runs=single is not None, measured=split_factors)
        if not isinstance(plan, SplitPlan) or not taken:
            return why
        parts = tuple(GpuPart(p.node, p.gpu_index, p.offloaded, int(p.gpu_bytes * scale)) for p in plan.parts)
        return SplitOffer(parts, plan.tokens_per_s, why)

    return splitter


def _split_gpu(room: GpuRoom, hw: NodeHardware, speed_factor: float) -> SplitGpu:
    gpu = next((g for g in hw.gpus if g.index == room.gpu_index), None)
    return SplitGpu(room.node, room.gpu_index, room.gpu_name, room.usable_bytes,
                    gpu.memory_bandwidth_gbps if gpu else None, node_link(hw), speed_factor)


def _single_speed(shape: ModelShape, single: SingleOption | None, hardware: Mapping[str, NodeHardware],
                  speed_factors: Mapping[str, float]) -> float | None:
    """Predicted decode speed of the best single-node option (None: none, or not known)."""
    if single is None or single.node not in hardware:
        return None
    hw = hardware[single.node]
    gpu = next((g for g in hw.gpus if g.index == single.gpu_index), None)
    return decode_tokens_per_s(shape, single.gpu_layers, hw, gpu, speed_factors.get(single.node, 1.0))
