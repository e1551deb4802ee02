"""Models the seeds discuss, as ModelShapes synthesized from their published configs.

`lookup("qwen2.5-coder-32b:q4_k_m")` gives the shape a GGUF of that model would have, so
`homefleet fit` and placement can reason about a model before it is downloaded. Weight bytes
come from the exact per-tensor parameter counts of the architecture and the quantization's
effective bits per weight (llama.cpp's mixes: Q4_K_M keeps some attn_v/ffn_down rows in
Q6_K and the output in Q6_K, which gives the 4.8-4.9 bits/weight of real files; e.g. Llama 2
7B Q4_K_M is 4.08 GB, Qwen2.5-Coder-32B Q4_K_M 19.9 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.model_shape import ModelShape, swa_layer_pattern

GB = 1000**3


@dataclass(frozen=True)
class Quant:
    """Effective bits per weight of a llama.cpp file type, per tensor group."""

    name: str
    layer_bpw: float  # blocks, mix included
    output_bpw: float  # output.weight
    embd_bpw: float  # token_embd.weight
    repack_fraction: float  # share of block bytes the CPU backend repacks (Q4_0/Q4_K)
    fallback_bpw: float = 0.0  # K-quants on rows that are not a multiple of 256 (Q4_K -> Q5_0)


QUANTS: dict[str, Quant] = {
    q.name: q
    for q in (
        Quant("Q3_K_M", 3.91, 6.5625, 3.4375, 0.20, 4.5),
        Quant("Q4_0", 4.55, 6.5625, 4.5, 1.0),
        Quant("Q4_K_S", 4.58, 6.5625, 4.5, 0.95, 5.5),
        Quant("Q4_K_M", 4.80, 6.5625, 4.5, 0.75, 5.5),
        Quant("Q5_K_M", 5.68, 6.5625, 5.5, 0.0, 6.0),
        Quant("Q6_K", 6.5625, 6.5625, 6.5625, 0.0, 8.5),
        Quant("Q8_0", 8.5, 8.5, 8.5, 0.0),
        Quant("F16", 16.0, 16.0, 16.0, 0.0),
        Quant("BF16", 16.0, 16.0, 16.0, 0.0),
    )
}
DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class Architecture:
    """Published config of one model (Hugging Face config.json numbers)."""

    name: str
    arch: str  # llama.cpp architecture
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    gated_ffn: bool = True  # SwiGLU/GeGLU: gate, up, down; False: up, down (GELU)
    fused_qkv: bool = False
    tied: bool = False
    sliding_window: int = 0
    aliases: tuple[str, ...] = ()

    def layer_params(self) -> int:
        q = self.n_head * self.head_dim
        kv = self.n_head_kv * self.head_dim
        attn = self.n_embd * (q + 2 * kv) + q * self.n_embd
        ffn = (3 if self.gated_ffn else 2) * self.n_embd * self.n_ff
        return attn + ffn

    def params(self) -> int:
        embd = self.n_vocab * self.n_embd
        return self.n_layers * self.layer_params() + embd * (1 if self.tied else 2)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama-2-7b", "llama", 32, 4096, 32, 32, 128, 11008, 32000, 4096, aliases=("llama2-7b",)),
    Architecture("llama-2-13b", "llama", 40, 5120, 40, 40, 128, 13824, 32000, 4096, aliases=("llama2-13b",)),
    Architecture("llama-2-70b", "llama", 80, 8192, 64, 8, 128, 28672, 32000, 4096, aliases=("llama2-70b",)),
    Architecture("llama-3.1-8b", "llama", 32, 4096, 32, 8, 128, 14336, 128256, 131072, aliases=("llama3.1-8b",)),
    Architecture("llama-30b", "llama", 60, 6656, 52, 52, 128, 17920, 32000, 2048, aliases=("llama-33b",)),
    Architecture("falcon-7b", "falcon", 32, 4544, 71, 1, 64, 18176, 65024, 2048, gated_ffn=False,
                 fused_qkv=True, tied=True),
    Architecture("falcon-40b", "falcon", 60, 8192, 128, 8, 64, 32768, 65024, 2048, gated_ffn=False, fused_qkv=True),
    Architecture("mpt-7b", "mpt", 32, 4096, 32, 32, 128, 16384, 50432, 2048, gated_ffn=False, fused_qkv=True,
                 tied=True),
    Architecture("qwen2.5-coder-14b", "qwen2", 48, 5120, 40, 8, 128, 13824, 152064, 32768),
    Architecture("qwen2.5-coder-32b", "qwen2", 64, 5120, 40, 8, 128, 27648, 152064, 32768),
    Architecture("deepseek-r1-distill-qwen-7b", "qwen2", 28, 3584, 28, 4, 128, 18944, 152064, 131072),
    Architecture("deepseek-r1-distill-qwen-14b", "qwen2", 48, 5120, 40, 8, 128, 13824, 152064, 131072),
    Architecture("deepseek-r1-distill-qwen-32b", "qwen2", 64, 5120, 40, 8, 128, 27648, 152064, 131072),
    Architecture("deepseek-r1-distill-llama-70b", "llama", 80, 8192, 64, 8, 128, 28672, 128256, 131072,
                 aliases=("deepseek-r1-distill-70b",)),
    Architecture("gemma-3-270m", "gemma3", 18, 640, 4, 1, 256, 2048, 262144, 32768, tied=True,
                 sliding_window=512, aliases=("gemma3-270m",)),
)
_BY_NAME = {a.name: a for a in ARCHITECTURES} | {alias: a for a in ARCHITECTURES for alias in a.aliases}


def names() -> list[str]:
    """Catalog names (without quantization suffix)."""
    return [a.name for a in ARCHITECTURES]


def parse_name(name: str) -> tuple[str, str]:
    """'Qwen2.5-Coder-32B:q5_k_m' -> ('qwen2.5-coder-32b', 'Q5_K_M'); default Q4_K_M."""
    base, _, quant = name.strip().lower().partition(":")
    return base, (quant.upper() or DEFAULT_QUANT)


def _bytes(params: int, bpw: float) -> int:
    return int(params * bpw / 8)


def shape_for(a: Architecture, quant: Quant) -> ModelShape:
    """Synthesize the ModelShape a GGUF of `a` at `quant` would have.

    As llama.cpp's quantizer does: K-quant rows must be multiples of 256, else a tensor falls
    back to a legacy type (Q4_K -> Q5_0, Q6_K -> Q8_0); the output (or a tied embedding, which
    serves as the output) is Q6_K, or Q8_0 for Falcon and for rows that are not multiples of 256.
    """
    k_rows_ok = a.n_embd % 256 == 0 and a.n_ff % 256 == 0
    layer_bpw = quant.layer_bpw if k_rows_ok or not quant.fallback_bpw else quant.fallback_bpw
    output_bpw = quant.output_bpw
    if quant.fallback_bpw and (a.n_embd % 256 or a.arch == "falcon"):
        output_bpw = max(output_bpw, 8.5)
    layer = _bytes(a.layer_params(), layer_bpw) + 2 * a.n_embd * 4  # + f32 norms
    embd = _bytes(a.n_vocab * a.n_embd, output_bpw if a.tied else quant.embd_bpw)
    output_norm = a.n_embd * 4
    output = embd + output_norm if a.tied else _bytes(a.n_vocab * a.n_embd, output_bpw) + output_norm
    swa = swa_layer_pattern(a.n_layers, 6) if a.sliding_window and a.arch == "gemma3" else ()
    ffn_tensor = _bytes(a.n_embd * a.n_ff, layer_bpw)
    return ModelShape(
        name=f"{a.name}:{quant.name.lower()}",
        architecture=a.arch,
        n_layers=a.n_layers,
        n_embd=a.n_embd,
        n_head=a.n_head,
        n_head_kv=(a.n_head_kv,) * a.n_layers,
        head_dim_k=a.head_dim,
        head_dim_v=a.head_dim,
        n_vocab=a.n_vocab,
        n_ctx_train=a.n_ctx,
        n_ff=a.n_ff,
        layer_weight_bytes=(layer,) * a.n_layers,
        output_bytes=output,
        token_embd_bytes=embd,
        file_bytes=a.n_layers * layer + embd + (0 if a.tied else output),
        weight_type=quant.name,
        output_tied=a.tied,
        sliding_window=a.sliding_window,
        swa_layers=swa,
        layer_repack_bytes=(int(layer * quant.repack_fraction),) * a.n_layers,
        output_repack_bytes=0,
        max_layer_tensor_bytes=ffn_tensor,
        n_params=a.params(),
    )


def lookup(name: str) -> ModelShape | None:
    """The shape of catalog model `name` ('model' or 'model:quant'); None when unknown."""
    base, quant = parse_name(name)
    a = _BY_NAME.get(base)
    q = QUANTS.get(quant)
    if a is None or q is None:
        return None
    return shape_for(a, q)


def quant_names() -> list[str]:
    return list(QUANTS)
