"""The one number placement needs from the estimator: memory at k layers on the GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MemoryNeed:
    """Memory one replica needs with some of its layers on one GPU.

    gpu_bytes: device memory on that GPU (weights, KV, compute buffer, CUDA context);
    ram_bytes: host memory (CPU-side weights, KV and buffers, process overhead).
    """

    gpu_bytes: int
    ram_bytes: int


# need(k) for k in 0..n_offloadable_layers: gpu_bytes grows with k, ram_bytes shrinks.
NeedFunction = Callable[[int], MemoryNeed]


def scaled_need(need: NeedFunction, factor: float) -> NeedFunction:
    """need(k) corrected by a measured/estimated factor (from llama.cpp's dry run)."""

    def corrected(k: int) -> MemoryNeed:
        raw = need(k)
        return MemoryNeed(int(raw.gpu_bytes * factor), int(raw.ram_bytes * factor))

    return corrected
