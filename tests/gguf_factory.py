"""Write small, real GGUF models that llama.cpp loads and runs (random weights).

Shared by unit, benchmark and end-to-end tests:

    from tests.gguf_factory import write_gguf, quantize
    path = write_gguf(tmp_path / "tiny.gguf", arch="llama", n_layers=2, n_embd=256)
    q4 = quantize(path, tmp_path / "tiny-q4_k_m.gguf", "Q4_K_M")

Architectures: "llama", "qwen2" (attention biases) and "gemma3" (tied embedding, q/k norms,
post norms, 5 sliding-window layers : 1 global). Weights are random normal (std 0.02) in F16
(norms F32), so text is garbage but every kernel runs. The tokenizer is a minimal SentencePiece
("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then word pieces up to n_vocab.
Quantization runs llama.cpp's quantizer in a child process (it once crashed when quantize and
load ran in one process).

SHAPES names the shapes of real models, for benchmarks whose speed depends on the shape
only (a GPU machine cannot download the real weights):

    python -m tests.gguf_factory --shape llama3.2-1b --quant Q4_K_M /tmp/llama-1b-q4_k_m.gguf
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ARCHITECTURES = ("llama", "qwen2", "gemma3")
# Real models' shapes (their config.json): the same tensors, random weights.
SHAPES = {
    "llama3.2-1b": dict(arch="llama", n_layers=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256,
                        tied_embedding=True, ctx=131072),
    "llama3.2-3b": dict(arch="llama", n_layers=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192, n_vocab=128256,
                        tied_embedding=True, ctx=131072),
    "gemma3-1b": dict(arch="gemma3", n_layers=26, n_embd=1152, n_head=4, n_head_kv=1, head_dim=256, n_ff=6912,
                      n_vocab=262144, ctx=32768),
}
_N_SPECIAL = 3  # <unk>, <s>, </s>


def write_gguf(
    path: str | Path,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 256,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int = 512,
    n_vocab: int = 1024,
    ctx: int = 4096,
    head_dim: int | None = None,
    sliding_window: int = 512,
    tied_embedding: bool | None = None,
    weight_dtype: str = "f16",
    seed: int = 0,
    name: str | None = None,
    sparse: bool = False,
    extra_metadata: dict[str, int] | None = None,
) -> Path:
    """Write a `arch`-shaped GGUF with random weights at `path` and return the path.

    head_dim defaults to n_embd // n_head; n_head_kv to n_head (no GQA); tied_embedding
    (no output.weight) defaults to True for gemma3 and False otherwise. weight_dtype is
    "f16" or "f32" for the 2-D weights. sparse=True declares the tensors but leaves their
    data as file holes (zeros, no disk use, instant): full-size shapes of real models for
    header and dry-run tests; weight_dtype may then be any ggml type name ("q4_k", "q8_0").
    extra_metadata adds `{arch}.{key}` uint32 fields (e.g. {"expert_count": 0, "expert_used_count": 1},
    a header llama.cpp aborts on while loading: GGML_ASSERT, the process dies).
    """
    import gguf

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, not {arch!r}")
    if n_vocab < _N_SPECIAL + 256 + 8:
        raise ValueError(f"n_vocab must be at least {_N_SPECIAL + 256 + 8} (specials and byte tokens)")
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    head_dim = head_dim or n_embd // n_head
    tied = (arch == "gemma3") if tied_embedding is None else tied_embedding
    if arch == "qwen2" and n_head * head_dim != n_embd:
        raise ValueError("qwen2 needs n_head * head_dim == n_embd")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wtype = {"f16": np.float16, "f32": np.float32}.get(weight_dtype.lower())
    if wtype is None and not sparse:
        raise ValueError("weight_dtype must be f16 or f32 unless sparse=True")

    def weight(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = ggml {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(wtype)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"factory-{arch}-{n_layers}L-{n_embd}")
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k": 15, "q6_k": 18}.get(weight_dtype.lower(), 1))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(n_vocab)
    if arch == "gemma3" or head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(sliding_window)
    for key, value in (extra_metadata or {}).items():
        w.add_uint32(f"{arch}.{key}", value)
    _add_tokenizer(w, n_vocab)

    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    specs = _tensor_specs(arch, n_layers, n_embd, n_ff, n_vocab, q_dim, kv_dim, head_dim, tied)
    if sparse:
        _write_sparse(w, path, specs, weight_dtype)
        return path
    for tname, shape, kind in specs:
        if kind == "weight":
            w.add_tensor(tname, weight(*shape))
        elif kind == "norm":
            w.add_tensor(tname, norm(shape[0]))
        else:
            w.add_tensor(tname, np.zeros(shape[0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensor_specs(arch, n_layers, n_embd, n_ff, n_vocab, q_dim, kv_dim, head_dim, tied):
    """(name, numpy shape, kind) for every tensor; numpy (rows, cols) is ggml {cols, rows}."""
    specs = [("token_embd.weight", (n_vocab, n_embd), "weight"), ("output_norm.weight", (n_embd,), "norm")]
    if not tied:
        specs.append(("output.weight", (n_vocab, n_embd), "weight"))
    for i in range(n_layers):
        b = f"blk.{i}"
        specs += [
            (f"{b}.attn_norm.weight", (n_embd,), "norm"),
            (f"{b}.attn_q.weight", (q_dim, n_embd), "weight"),
            (f"{b}.attn_k.weight", (kv_dim, n_embd), "weight"),
            (f"{b}.attn_v.weight", (kv_dim, n_embd), "weight"),
        ]
        if arch == "qwen2":
            specs += [(f"{b}.attn_{t}.bias", (n,), "bias") for t, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if arch == "gemma3":
            specs += [(f"{b}.attn_q_norm.weight", (head_dim,), "norm"), (f"{b}.attn_k_norm.weight", (head_dim,), "norm")]
        specs.append((f"{b}.attn_output.weight", (n_embd, q_dim), "weight"))
        if arch == "gemma3":
            specs.append((f"{b}.post_attention_norm.weight", (n_embd,), "norm"))
        specs += [
            (f"{b}.ffn_norm.weight", (n_embd,), "norm"),
            (f"{b}.ffn_gate.weight", (n_ff, n_embd), "weight"),
            (f"{b}.ffn_up.weight", (n_ff, n_embd), "weight"),
            (f"{b}.ffn_down.weight", (n_embd, n_ff), "weight"),
        ]
        if arch == "gemma3":
            specs.append((f"{b}.post_ffw_norm.weight", (n_embd,), "norm"))
    return specs


def _write_sparse(w, path: Path, specs, weight_dtype: str) -> None:
    """Declare every tensor, write the header, and extend the file with holes (all zeros)."""
    import gguf

    wtype = gguf.GGMLQuantizationType[weight_dtype.upper()]
    block, type_size = gguf.GGML_QUANT_SIZES[wtype]
    data_bytes = 0
    for tname, shape, kind in specs:
        qtype = wtype if kind == "weight" else gguf.GGMLQuantizationType.F32
        b, ts = (block, type_size) if kind == "weight" else (1, 4)
        if shape[-1] % b:
            raise ValueError(f"{tname}: row of {shape[-1]} is not a multiple of {weight_dtype}'s block {b}")
        nbytes = int(np.prod(shape)) // b * ts
        w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    size = path.stat().st_size
    data_start = -(-size // w.data_alignment) * w.data_alignment
    os.truncate(path, data_start + data_bytes)


def _add_tokenizer(w, n_vocab: int) -> None:
    """A SentencePiece vocabulary llama.cpp accepts: specials, 256 byte tokens, word pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    i = 0
    while len(words) < n_vocab - len(tokens):
        words.append(f"\u2581{letters[i % 26]}{letters[i // 26 % 26]}{i}")
        i += 1
    tokens += words[: n_vocab - len(tokens)]
    types += [gguf.TokenType.NORMAL] * (n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# llama_ftype values of llama.cpp's include/llama.h
QUANT_FTYPES = {
    "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32,
}

_QUANTIZE_CHILD = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 0
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if rc else 0)
"""


def quantize(src: str | Path, dst: str | Path, quant: str = "Q4_K_M", timeout_s: float = 600) -> Path:
    """Quantize `src` to `dst` with llama.cpp (in a child process) and return `dst`."""
    ftype = QUANT_FTYPES.get(quant.upper())
    if ftype is None:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_FTYPES)}")
    dst = Path(dst)
    proc = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_CHILD, str(src), str(dst), str(ftype)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0 or not dst.exists():
        raise RuntimeError(f"quantize {src} -> {quant} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return dst


_GENERATE_CHILD = """
import sys, json, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("hello world", max_tokens=int(sys.argv[2]), temperature=0.0)
print(json.dumps({"text": out["choices"][0]["text"], "n": out["usage"]["completion_tokens"]}))
"""


def generate_in_child(path: str | Path, max_tokens: int = 4, timeout_s: float = 300) -> dict:
    """Load `path` with llama-cpp-python in a child process and generate a few tokens.

    Returns {"text": ..., "n": completion tokens}; raises RuntimeError when llama.cpp fails.
    """
    import json

    proc = subprocess.run(
        [sys.executable, "-c", _GENERATE_CHILD, str(path), str(max_tokens)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp could not run {path} (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Write a GGUF of a real model's shape with random weights.")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--quant", default="Q4_K_M", help=f"one of {', '.join(QUANT_FTYPES)}")
    parser.add_argument("out", help="the GGUF to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.quant.upper() == "F16":
        write_gguf(out, name=f"random-{args.shape}", **SHAPES[args.shape])
    else:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            f16 = write_gguf(Path(tmp) / "f16.gguf", name=f"random-{args.shape}", **SHAPES[args.shape])
            quantize(f16, out, args.quant)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
