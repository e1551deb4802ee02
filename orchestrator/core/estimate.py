"""Analytic memory estimate of a llama.cpp model at a context size and GPU layer count.

Mirrors what llama.cpp (the build bundled with llama-cpp-python 0.3.36) allocates for the
context a replica builds: the batched engine's (worker/batch_engine.py `context_params`),
`n_slots` sequences, one KV stream per slot (`kv_unified=False`), `swa_full=False`,
`n_outputs_max = n_slots`. `EstimateOptions(swa_full=True, n_outputs_max=0)` describes
llama-cpp-python's own `Llama` instead (an embedding model, the accuracy benchmark).

- n_gpu_layers: the offloadable units are the n_layers blocks plus the output layer; k of
  them go to the GPU from the end, so the output layer goes first and block i is on the
  GPU when i >= n_layers + 1 - k. The token embedding always stays on the CPU. A tied
  output (no output.weight) offloads a copy of the embedding.
- weights on the CPU are memory-mapped (file-backed pages). A CPU-only process (k = 0: no
  CUDA host buffer type ahead of it) also repacks Q4_0/Q4_K/IQ4_NL/MXFP4 matmul weights into
  an anonymous buffer (x86 AVX2 / ARM), while the mapped source pages stay resident.
- KV cache, per slot (every slot has the full context): n_ctx is padded to 256 cells; per
  layer cells x (K row + V row) of the KV type; without flash attention V is stored
  transposed at the widest layer's width; sliding-window layers hold, per slot,
  min(pad256(n_ctx), pad256(window + n_ubatch)) cells unless swa_full
  (llama-kv-cache-iswa.cpp: `GGML_PAD(min(size_base, n_swa + n_ubatch), 256)` per stream);
  MLA layers hold K (kv_lora_rank + rope dims) only. A layer's KV lives where the layer lives.
- compute: the worst-case graph of one ubatch against a full slot (see `graph_peak_bytes`;
  each stream attends over its own cells, so the graph does not grow with the slots).
  A GPU buffer (and a pinned CUDA_Host buffer) is committed in full, with logits for the
  rows llama.cpp reserves (n_outputs_max: one per slot; n_batch for llama.cpp's default);
  a plain CPU buffer is committed by the OS only where it is touched, so the CPU figure is
  the graph's peak with the rows a decode really asks for (one per slot; one for `Llama`,
  which computes logits for the last token only) plus the CPU backend's scratch buffer.
- output buffer (host): f32 logits of n_vocab per slot (llama.cpp reserves
  max(n_seq_max, outputs of a decode) rows; a decode of the engine asks one per sequence).
- fixed: the CUDA context, cuBLAS and llama.cpp's CUDA pool per GPU used (k > 0), and the
  host process (Python, llama.cpp, vocabulary, sampler buffers).

All constants below are calibrated with tests/bench/estimate_accuracy.py (RSS of real runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from orchestrator.core.gguf_file import ggml_type
from orchestrator.core.memory import MemoryNeed, NeedFunction
from orchestrator.core.model_shape import ModelShape

MIB = 1024**2
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
CTX_PAD = 256

# Host process: Python + numpy + llama_cpp imported, llama.cpp's libraries, backends, threads
# and model metadata (RSS, anonymous and file-backed; measured 46 MiB, plus a margin).
PROCESS_BASE_BYTES = 52 * MIB
# llama.cpp's vocabulary per token: text, score, attributes, lookup maps (measured 171 B).
VOCAB_BYTES_PER_TOKEN = 180
# llama-cpp-python's sampling allocates n_vocab x 12 B arrays per completion that only a full
# garbage collection frees (~3 MiB per completion for a 262k vocab). The replica collects
# after every GC_EVERY_REQUESTS requests, so at most that many plus the running one are alive.
GC_EVERY_REQUESTS = 4
SAMPLER_BYTES_PER_TOKEN = (GC_EVERY_REQUESTS + 1) * 12
# CUDA context, cuBLAS handle and workspace, llama.cpp's CUDA memory pool, per GPU used.
CUDA_OVERHEAD_BYTES = 384 * MIB
# Host memory the CUDA runtime and driver take in a process that uses a GPU.
CUDA_HOST_OVERHEAD_BYTES = 256 * MIB


class EstimateError(ValueError):
    """Options llama.cpp would refuse (the message says why)."""


@dataclass(frozen=True)
class EstimateOptions:
    """Settings of the llama.cpp context (defaults: the batched engine's, one slot).

    n_ctx: tokens per slot (0: the model's training context); every slot has all of them.
    n_slots: sequences served at once, one KV stream each (the replica's `parallel`).
    swa_full: sliding-window layers keep the full context (llama-cpp-python's `Llama`
      default); the engine keeps the window plus a ubatch (False).
    n_outputs_max: logits rows a decode can hold; None: one per slot (the engine's
      `context_params`); 0: llama.cpp's default, n_batch (llama-cpp-python's `Llama`).
    flash_attn: False is also the figure for llama.cpp's "auto" (the engine's default):
      without flash attention the KV and the compute buffer are never smaller.
    """

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    kv_type: str = "f16"
    flash_attn: bool = False
    swa_full: bool = False
    n_slots: int = 1
    n_outputs_max: int | None = None

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise EstimateError(f"unknown KV cache type {self.kv_type!r}; one of {', '.join(KV_TYPES)}")
        if ggml_type(self.kv_type).block_size > 1 and not self.flash_attn:
            raise EstimateError(
                f"a {self.kv_type} KV cache needs flash attention: llama.cpp refuses a quantized "
                "V cache without it (use --flash-attn or kv_type f16)"
            )
        if self.n_ctx < 0 or self.n_batch < 1 or self.n_ubatch < 1:
            raise EstimateError("n_ctx must be >= 0 (0: the model's training context), n_batch and n_ubatch >= 1")
        if self.n_slots < 1:
            raise EstimateError(f"n_slots must be >= 1, got {self.n_slots}")
        if self.n_outputs_max is not None and self.n_outputs_max < 0:
            raise EstimateError(f"n_outputs_max must be >= 0, got {self.n_outputs_max}")


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_gpu_bytes: int = 0
    weights_cpu_bytes: int = 0  # mapped file pages plus repacked copies
    kv_gpu_bytes: int = 0
    kv_cpu_bytes: int = 0
    compute_gpu_bytes: int = 0
    compute_cpu_bytes: int = 0
    overhead_gpu_bytes: int = 0
    overhead_cpu_bytes: int = 0
    weights_repacked_bytes: int = 0  # part of weights_cpu_bytes that is anonymous memory


@dataclass(frozen=True)
class MemoryEstimate:
    """gpu_bytes on the one GPU; ram_bytes anonymous host memory (process included);
    mmap_bytes file-backed weight pages resident on the host."""

    gpu_bytes: int
    ram_bytes: int
    mmap_bytes: int
    n_gpu_layers: int
    n_ctx: int  # per slot, after llama.cpp's padding
    breakdown: MemoryBreakdown = field(default_factory=MemoryBreakdown)
    n_slots: int = 1

    @property
    def host_bytes(self) -> int:
        """All host RAM the replica keeps resident: anonymous plus mapped weights."""
        return self.ram_bytes + self.mmap_bytes


def pad_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def row_bytes(type_name: str, n: int) -> int:
    t = ggml_type(type_name)
    return -(-n // t.block_size) * t.type_size


def slot_cells(shape: ModelShape, opts: EstimateOptions) -> int:
    """KV cells of one slot's stream: its context padded to 256 (llama.cpp's n_ctx_seq)."""
    return pad_ctx(opts.n_ctx or shape.n_ctx_train)


def ubatch_tokens(shape: ModelShape, opts: EstimateOptions) -> int:
    """Tokens of the worst-case ubatch: n_ubatch, at most n_batch and the whole context."""
    return min(opts.n_ubatch, opts.n_batch, opts.n_slots * slot_cells(shape, opts))


def output_rows(shape: ModelShape, opts: EstimateOptions) -> tuple[int, int]:
    """(rows of logits llama.cpp reserves in the graph, rows a decode really computes).

    The engine asks one row per sequence: n_outputs_max = n_slots reserved and used. With
    llama.cpp's default (0) the graph reserves a whole ubatch while llama-cpp-python's
    `Llama` computes the last token's row only.
    """
    u = ubatch_tokens(shape, opts)
    if opts.n_outputs_max == 0:
        return u, 1
    rows = min(u, opts.n_outputs_max or opts.n_slots)
    return rows, rows


def output_buffer_bytes(shape: ModelShape, opts: EstimateOptions) -> int:
    """Host f32 logits: llama.cpp keeps max(n_seq_max, rows of a decode) rows of n_vocab."""
    return 4 * shape.n_vocab * max(opts.n_slots, output_rows(shape, opts)[1])


def kv_cells(shape: ModelShape, il: int, opts: EstimateOptions) -> int:
    """Cells of block `il` in one slot's stream (sliding-window layers: window + ubatch)."""
    n_ctx = slot_cells(shape, opts)
    if not shape.is_swa(il) or opts.swa_full:
        return n_ctx
    return min(n_ctx, pad_ctx(shape.sliding_window + ubatch_tokens(shape, opts)))


def kv_layer_bytes(shape: ModelShape, il: int, opts: EstimateOptions) -> int:
    """K and V cache bytes of block `il`, all slots (one stream of kv_cells each)."""
    cells = kv_cells(shape, il, opts) * opts.n_slots
    k = row_bytes(opts.kv_type, shape.n_embd_k_gqa(il))
    if shape.is_mla:
        return cells * k
    v_width = shape.n_embd_v_gqa(il) if opts.flash_attn else max(map(shape.n_embd_v_gqa, range(shape.n_layers)))
    return cells * (k + row_bytes(opts.kv_type, v_width))


def graph_peak_bytes(shape: ModelShape, opts: EstimateOptions, n_outputs: int, n_kv: int | None = None) -> int:
    """Peak of ggml's graph allocator for one ubatch against n_kv cached cells.

    Fitted to llama.cpp's reserved compute buffers (no_alloc dry runs) of llama-, qwen2- and
    gemma3-shaped models: the largest of the attention step (without flash attention the
    f32 KQ matrix n_kv x n_ubatch x n_head), the feed-forward step, and the output step
    (f32 logits of n_outputs rows), plus the attention masks alive through every layer
    (a sliding-window model has a second one, over the window's cells).
    With several slots the ubatch is split among their streams and each stream attends
    over its own cells, so n_kv is one slot's (the default) and the sizes do not grow.
    """
    n_kv = slot_cells(shape, opts) if n_kv is None else n_kv
    u = ubatch_tokens(shape, opts)
    q_dim = shape.n_head * shape.head_dim_k
    kv_dim = max((shape.n_embd_k_gqa(il) for il in range(shape.n_layers)), default=0)
    wide = max(shape.n_embd, q_dim)
    swa = next((il for il in range(shape.n_layers) if shape.is_swa(il)), None)
    mask_kv = n_kv + (min(n_kv, kv_cells(shape, swa, opts)) if swa is not None else 0)  # the window's own mask
    mask = mask_kv * u * (2 if opts.flash_attn else 4)
    attn = (5 * wide + shape.n_embd + 2 * kv_dim) * u * 4
    if not opts.flash_attn:
        attn += n_kv * u * shape.n_head * 4
    n_ff = shape.n_ff * max(1, shape.n_expert_used)
    ffn = max(3 * n_ff + 5 * shape.n_embd, 4 * n_ff + 3 * shape.n_embd // 2) * u * 4
    out = (shape.n_vocab * min(n_outputs, u) + 2 * shape.n_embd * u) * 4
    return max(attn, ffn, out) + mask


def cpu_work_bytes(shape: ModelShape, opts: EstimateOptions, n_kv: int) -> int:
    """The CPU backend's scratch buffer: matmul inputs converted to the weights' dot type
    (about a byte per element of the widest activation) and, without flash attention, the
    softmax converted to f16 for the V product (n_kv x n_ubatch x n_head x 2)."""
    u = min(opts.n_ubatch, opts.n_batch, n_kv)
    act = max(shape.n_embd, shape.n_ff, shape.n_head * shape.head_dim_k) * u * 2
    if opts.flash_attn:
        return act
    return max(act, n_kv * u * shape.n_head * 2)


def host_process_bytes(shape: ModelShape) -> int:
    """RSS of a replica process before its buffers: Python, llama.cpp, vocabulary, sampler."""
    return PROCESS_BASE_BYTES + shape.n_vocab * (VOCAB_BYTES_PER_TOKEN + SAMPLER_BYTES_PER_TOKEN)


def estimate(shape: ModelShape, n_gpu_layers: int, opts: EstimateOptions, gpu: bool = True) -> MemoryEstimate:
    """Memory of `shape` with `n_gpu_layers` offloadable layers on one GPU (llama.cpp's rule)."""
    n = shape.n_layers
    k = 0 if not gpu else (n + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n + 1))
    first_gpu = n + 1 - k  # block il is on the GPU when il >= first_gpu
    output_on_gpu = k >= 1
    cpu_only = k == 0
    n_ctx = slot_cells(shape, opts)

    w_gpu = sum(shape.layer_weight_bytes[first_gpu:]) + (shape.output_bytes if output_on_gpu else 0)
    w_mapped = shape.token_embd_bytes + shape.other_bytes + sum(shape.layer_weight_bytes[:first_gpu])
    repacked = 0
    if not output_on_gpu:
        w_mapped += shape.output_bytes - (shape.token_embd_bytes if shape.output_tied else 0)
    if cpu_only:
        repacked = sum(shape.layer_repack_bytes[:n]) + shape.output_repack_bytes

    kv = [kv_layer_bytes(shape, il, opts) for il in range(n)]
    kv_gpu, kv_cpu = sum(kv[first_gpu:]), sum(kv[:first_gpu])

    u = ubatch_tokens(shape, opts)
    reserved_rows, decode_rows = output_rows(shape, opts)
    outputs = output_buffer_bytes(shape, opts)
    if cpu_only:
        compute_gpu = 0
        compute_cpu = graph_peak_bytes(shape, opts, decode_rows) + cpu_work_bytes(shape, opts, n_ctx) + outputs
        overhead_gpu = 0
        overhead_cpu = host_process_bytes(shape)
    else:
        compute_gpu = graph_peak_bytes(shape, opts, reserved_rows)
        if first_gpu > 0:  # partial offload: the GPU also takes CPU weights for big batches
            compute_gpu += shape.max_layer_tensor_bytes
            # pinned CUDA_Host buffer (committed) plus the CPU backend's scratch for its layers
            compute_cpu = graph_peak_bytes(shape, opts, decode_rows) + cpu_work_bytes(shape, opts, n_ctx) + outputs
        else:
            compute_cpu = shape.n_embd * u * 4 + outputs
        overhead_gpu = CUDA_OVERHEAD_BYTES
        overhead_cpu = host_process_bytes(shape) + CUDA_HOST_OVERHEAD_BYTES

    b = MemoryBreakdown(
        weights_gpu_bytes=w_gpu,
        weights_cpu_bytes=w_mapped + repacked,
        kv_gpu_bytes=kv_gpu,
        kv_cpu_bytes=kv_cpu,
        compute_gpu_bytes=compute_gpu,
        compute_cpu_bytes=compute_cpu,
        overhead_gpu_bytes=overhead_gpu,
        overhead_cpu_bytes=overhead_cpu,
        weights_repacked_bytes=repacked,
    )
    return MemoryEstimate(
        gpu_bytes=w_gpu + kv_gpu + compute_gpu + overhead_gpu,
        ram_bytes=repacked + kv_cpu + compute_cpu + overhead_cpu,
        mmap_bytes=w_mapped,
        n_gpu_layers=k,
        n_ctx=n_ctx,
        breakdown=b,
        n_slots=opts.n_slots,
    )


def need_function(shape: ModelShape, opts: EstimateOptions) -> NeedFunction:
    """need(k) for k in 0..n_layers+1: GPU bytes and host bytes that must stay resident.

    Host bytes are the anonymous memory plus the mapped weights the CPU reads through the
    mapping; the mapped source pages of repacked weights are left out (they were read once
    at load and the kernel may drop them), so a CPU-only Q4_K_M model is not counted twice.
    """
    cache: dict[int, MemoryNeed] = {}

    def need(k: int) -> MemoryNeed:
        if k not in cache:
            e = estimate(shape, k, opts, gpu=True)
            ram = e.ram_bytes + e.mmap_bytes - e.breakdown.weights_repacked_bytes
            cache[k] = MemoryNeed(gpu_bytes=e.gpu_bytes, ram_bytes=ram)
        return cache[k]

    return need


def slot_needs(shape: ModelShape, opts: EstimateOptions) -> Callable[[int], NeedFunction]:
    """needs(s): need(k) with `s` slots (opts' other settings), each built once."""
    cache: dict[int, NeedFunction] = {}

    def needs(n_slots: int) -> NeedFunction:
        if n_slots not in cache:
            cache[n_slots] = need_function(shape, replace(opts, n_slots=n_slots))
        return cache[n_slots]

    return needs
