"""What the memory estimate needs to know about a model: its shape and per-layer weights.

`shape_from_gguf(path)` reads it from a GGUF header; the catalog synthesizes the same
`ModelShape` for models that are not downloaded. Names follow llama.cpp's hparams.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.gguf_file import (
    FILE_TYPE_NAMES,
    ArraySummary,
    GGUFHeader,
    TensorInfo,
    read_gguf_header,
)

# Sliding-window layer pattern per architecture when the file sets a window but no pattern
# (llama.cpp src/models/*.cpp load_swa_pattern): (period, dense_first). With period p and
# dense_first False, layer il is a sliding-window layer when il % p < p - 1 (gemma3: 5 local
# then 1 global); with dense_first True, when il % p != 0; period 1 means every layer.
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "exaone4": (4, False), "exaone-moe": (4, False), "llama4": (4, False),
    "olmo2": (4, False), "gpt-oss": (2, False), "afmoe": (4, False), "smallthinker": (4, True),
    "phi3": (1, False), "plamo3": (8, False), "mellum": (4, False),
}

# Weight types the CPU backend repacks into an anonymous buffer on x86 with AVX2 (ggml-cpu
# repack.cpp): their CPU-side copies live in RAM in addition to the mapped file pages.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """Shape and weight sizes of one model file (or catalog entry), in llama.cpp's terms."""

    name: str
    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    n_ff: int
    layer_weight_bytes: tuple[int, ...]  # sum of blk.N.* per layer
    output_bytes: int  # output.weight (+ bias) + output_norm; token_embd's size when tied
    token_embd_bytes: int
    file_bytes: int
    weight_type: str  # e.g. "Q4_K_M"
    output_tied: bool = False  # no output.weight: llama.cpp reuses token_embd for the output
    other_bytes: int = 0  # tensors outside blocks/output/embedding (rope_freqs, ...): CPU side
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()  # per layer: True for a sliding-window layer
    kv_lora_rank: int = 0  # MLA (deepseek2-style): K cache holds kv_lora_rank + rope_dim, no V
    rope_dim: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    layer_repack_bytes: tuple[int, ...] = ()  # per layer: bytes the CPU backend repacks
    output_repack_bytes: int = 0
    max_layer_tensor_bytes: int = 0  # largest single tensor in a block
    n_params: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def weight_bytes(self) -> int:
        """All weight bytes once (a tied output shares the embedding)."""
        tied = self.token_embd_bytes if self.output_tied else 0
        return sum(self.layer_weight_bytes) + self.output_bytes - tied + self.token_embd_bytes + self.other_bytes

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def n_embd_k_gqa(self, il: int) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.rope_dim
        return self.head_dim_k * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return 0 if self.is_mla else self.head_dim_v * self.n_head_kv[il]


def swa_layer_pattern(n_layers: int, period: int, dense_first: bool = False) -> tuple[bool, ...]:
    """Per-layer sliding-window flags, as llama_hparams::set_swa_pattern sets them."""
    if dense_first:
        return tuple(period == 0 or il % period != 0 for il in range(n_layers))
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layers))


def repackable(t: TensorInfo) -> bool:
    """Whether the CPU backend would repack this weight (matmul weight of a repacked type)."""
    return (
        len(t.shape) >= 2 and t.name.endswith(".weight") and t.type_name in REPACKED_TYPES
        and t.shape[1] % 8 == 0 and not t.name.startswith("token_embd")
    )


def _per_layer(value: Any, n_layers: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n_layers
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value]
        return tuple(vals[:n_layers]) + (vals[-1] if vals else default,) * max(0, n_layers - len(vals))
    return (int(value),) * n_layers


def _weight_type(header: GGUFHeader) -> str:
    ftype = header.get("general.file_type")
    if isinstance(ftype, int) and ftype in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[ftype]
    counts = Counter(t.type_name for t in header.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else "unknown"


def _swa_layers(header: GGUFHeader, arch: str, n_layers: int, window: int) -> tuple[bool, ...]:
    if window <= 0:
        return ()
    pattern = header.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern:
        flags = [bool(v) for v in pattern]
        return tuple(flags[il] if il < len(flags) else False for il in range(n_layers))
    period, dense_first = SWA_PATTERNS.get(arch, (0, False))
    if isinstance(pattern, int):
        period = pattern
    if period == 0 and arch not in SWA_PATTERNS:
        return ()  # llama.cpp ignores a window for architectures without SWA support
    return swa_layer_pattern(n_layers, period, dense_first)


def shape_from_header(header: GGUFHeader, name: str | None = None) -> ModelShape:
    arch = str(header.get("general.architecture", "llama"))
    k = lambda key, default=None: header.get(f"{arch}.{key}", default)  # noqa: E731
    n_layers = int(k("block_count", 0))
    n_embd = int(k("embedding_length", 0))
    heads = _per_layer(k("attention.head_count"), n_layers, 0)
    n_head = max(heads) if heads else 0
    n_head_kv = _per_layer(k("attention.head_count_kv"), n_layers, n_head)
    head_dim_k = int(k("attention.key_length", n_embd // n_head if n_head else 0))
    head_dim_v = int(k("attention.value_length", head_dim_k))
    tokens = header.get("tokenizer.ggml.tokens")
    embd = header.tensor("token_embd.weight")
    n_vocab = int(k("vocab_size", 0) or (len(tokens) if isinstance(tokens, (list, ArraySummary)) else 0))
    if not n_vocab and embd is not None and len(embd.shape) > 1:
        n_vocab = embd.shape[1]
    n_ff_raw = k("feed_forward_length", 0)
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, list) else int(n_ff_raw or 0)
    window = int(k("attention.sliding_window", 0) or 0)
    kv_lora_rank = int(k("attention.kv_lora_rank", 0) or 0)

    layer_bytes = [0] * n_layers
    layer_repack = [0] * n_layers
    max_tensor = 0
    out_bytes = out_repack = other = 0
    has_output = False
    for t in header.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m[1]) < n_layers:
            il = int(m[1])
            layer_bytes[il] += t.n_bytes
            layer_repack[il] += t.n_bytes if repackable(t) else 0
            max_tensor = max(max_tensor, t.n_bytes)
        elif t.name.startswith("output"):
            out_bytes += t.n_bytes
            has_output = has_output or t.name == "output.weight"
            out_repack += t.n_bytes if repackable(t) else 0
        elif t.name != "token_embd.weight":
            other += t.n_bytes
    embd_bytes = embd.n_bytes if embd is not None else 0
    if not has_output and embd is not None:
        out_bytes += embd_bytes
        out_repack += embd_bytes if embd.type_name in REPACKED_TYPES and embd.shape[1] % 8 == 0 else 0
    n_params = sum(_elements(t) for t in header.tensors)
    return ModelShape(
        name=name or str(header.get("general.name") or Path(header.path).stem),
        architecture=arch,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=n_vocab,
        n_ctx_train=int(k("context_length", 0) or 0),
        n_ff=n_ff,
        layer_weight_bytes=tuple(layer_bytes),
        output_bytes=out_bytes,
        token_embd_bytes=embd_bytes,
        file_bytes=header.file_bytes,
        weight_type=_weight_type(header),
        output_tied=not has_output,
        other_bytes=other,
        sliding_window=window,
        swa_layers=_swa_layers(header, arch, n_layers, window),
        kv_lora_rank=kv_lora_rank,
        rope_dim=int(k("rope.dimension_count", 0) or 0) if kv_lora_rank else 0,
        n_expert=int(k("expert_count", 0) or 0),
        n_expert_used=int(k("expert_used_count", 0) or 0),
        layer_repack_bytes=tuple(layer_repack),
        output_repack_bytes=out_repack,
        max_layer_tensor_bytes=max_tensor,
        n_params=n_params,
    )


def _elements(t: TensorInfo) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def shape_from_gguf(path: str | Path, name: str | None = None) -> ModelShape:
    """Read the ModelShape of the GGUF file at `path` (header only)."""
    return shape_from_header(read_gguf_header(path), name)


__all__ = ["ModelShape", "REPACKED_TYPES", "SWA_PATTERNS", "repackable", "shape_from_gguf",
           "shape_from_header", "swa_layer_pattern"]
