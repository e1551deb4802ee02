"""llama.cpp's own memory figure for a model, without allocating it (run in a child process).

    python -m worker.dry_run MODEL.gguf --ctx 8192 --gpu-layers 99 [--parallel 4]
                             [--kv-type q8_0 --flash-attn on|off|auto] --json

The context is the one a replica's batched engine builds (worker/batch_engine.py
`context_params`): `--parallel` slots, each with the full `--ctx`, one KV stream per slot,
`swa_full=False`, one logits row per slot; so the estimate, the dry run and the engine
agree. llama.cpp 0.3.36 (the bundled build) has a real dry run: `llama_model_params.no_alloc`
loads metadata only and the context "simulates" its allocations. The sizes are read from
llama.cpp's log lines (the C++ `llama_get_memory_breakdown` is not callable from Python):
  - KV cache:  "llama_kv_cache: size = X MiB (N cells, L layers, ...)" per cache (all
               streams), and per layer the device ("layer  3: dev = CUDA0");
  - compute:   "sched_reserve: <buffer> compute buffer size = X MiB" per backend buffer;
  - output:    "<buffer> output buffer size = X MiB";
  - flash attention as resolved ("auto"): "Flash Attention enabled" / "not supported";
  - weights:   no_alloc buffers are empty, so the tensor bytes come from the GGUF header, split
               by llama.cpp's own layer->device assignment ("layer N assigned to device X")
               and by whether it created a CPU_REPACK buffer (weights copied to anonymous RAM).
The graph is reserved with the rows of logits the engine asks for (one per slot), so the
CPU compute buffer is also what a decode touches; pinned host buffers (CUDA_Host) count
in full. What llama.cpp does not report is added the way the analytic estimate adds it:
the process itself is measured (RSS after the dry load: Python, llama.cpp, the vocabulary)
plus the sampler allowance; the CPU backend's scratch buffer; and, with layers on a GPU,
the CUDA context allowance.

`dry_run()` runs the child and parses its JSON; `measure_in_process()` is the child's body.
Importable and runnable without Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1024**2
_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
_RE_LAYER_DEV = re.compile(r"load_tensors: layer +(\d+) assigned to device (\S+?),")
_RE_KV_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
_RE_KV_LAYER = re.compile(r"llama_kv_cache: layer +(\d+): dev = (\S+)")
_RE_COMPUTE = re.compile(r"sched_reserve: +(\S+) compute buffer size = +([\d.]+) MiB")
_RE_OUTPUT = re.compile(r"(\S+) +output buffer size = +([\d.]+) MiB")
_RE_MODEL_BUF = re.compile(r"load_tensors: +(\S+) model buffer size")
_RE_FLASH = re.compile(r"Flash Attention (enabled|not supported)")
FLASH_CHOICES = {"on": True, "off": False, "auto": None}


@dataclass
class DryRunResult:
    """Bytes llama.cpp would use: on the GPU(s), in host RAM (anonymous), and mapped weights."""

    gpu_bytes: int = 0
    ram_bytes: int = 0
    mmap_bytes: int = 0
    weights_gpu_bytes: int = 0
    weights_cpu_bytes: int = 0
    repacked_bytes: int = 0
    kv_gpu_bytes: int = 0
    kv_cpu_bytes: int = 0
    compute_gpu_bytes: int = 0
    compute_cpu_bytes: int = 0
    compute_cpu_alloc_bytes: int = 0
    output_bytes: int = 0
    work_bytes: int = 0
    process_bytes: int = 0  # RSS of the dry-run process: Python, llama.cpp, vocabulary, metadata
    n_slots: int = 1  # the slots (sequences) the context was built for
    flash_attn: bool | None = None  # as llama.cpp resolved it (None: not known)
    buffers: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _is_host(buffer_name: str) -> bool:
    return buffer_name.startswith("CPU") or buffer_name.endswith("_Host")


def _capture_logs():
    """Route llama.cpp's log (all levels) into a list; return (lines, keepalive)."""
    import llama_cpp

    lines: list[str] = []
    partial = [""]

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        partial[0] += (text or b"").decode("utf-8", errors="replace")
        *done, partial[0] = partial[0].split("\n")
        lines.extend(done)

    llama_cpp.llama_log_set(_cb, None)
    return lines, _cb


def _context(model, n_ctx: int, n_slots: int, n_batch: int, n_ubatch: int, kv: int, flash_attn: bool | None):
    """The batched engine's context (worker/batch_engine.py), as a replica would build it."""
    import llama_cpp

    from worker.batch_engine import context_params

    params = context_params(n_ctx, n_slots, n_batch, n_ubatch=n_ubatch, n_threads=1, flash_attn=flash_attn,
                            type_k=kv, type_v=kv)
    return llama_cpp.llama_init_from_model(model, params)


def _process_rss_bytes() -> int:
    """Resident anonymous plus file-backed bytes of this process (0 where /proc is missing)."""
    total = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def measure_in_process(
    path: str, n_ctx: int, n_gpu_layers: int, n_batch: int = 512, n_ubatch: int = 512,
    kv_type: str = "f16", flash_attn: bool | None = False, n_slots: int = 1,
) -> DryRunResult:
    """Load `path` with no_alloc and collect llama.cpp's figures (call in a child process).

    n_ctx is per slot; flash_attn None is llama.cpp's "auto" (the engine's default)."""
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orchestrator.core.gguf_file import read_gguf_header
    from orchestrator.core.estimate import (
        CUDA_HOST_OVERHEAD_BYTES,
        CUDA_OVERHEAD_BYTES,
        SAMPLER_BYTES_PER_TOKEN,
        EstimateOptions,
        cpu_work_bytes,
        slot_cells,
    )
    from orchestrator.core.model_shape import shape_from_header

    result = DryRunResult(n_slots=n_slots)
    lines, _keep = _capture_logs()
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    mp.no_alloc = True
    mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # no_alloc asserts without mmap off
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    if not model:
        result.error = "llama.cpp could not load the model: " + " | ".join(lines[-5:])
        return result
    ctx = _context(model, n_ctx, n_slots, n_batch, n_ubatch, _KV_TYPES[kv_type], flash_attn)
    if not ctx:
        result.error = "llama.cpp could not create the context: " + " | ".join(lines[-5:])
        return result
    first = list(lines)
    llama_cpp.llama_free(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    # measured: Python, llama.cpp, vocabulary; plus llama-cpp-python's sampler garbage
    result.process_bytes = _process_rss_bytes() + n_vocab * SAMPLER_BYTES_PER_TOKEN
    llama_cpp.llama_model_free(model)
    resolved = [m[1] for line in first if (m := _RE_FLASH.search(line))]
    result.flash_attn = (resolved[-1] == "enabled") if resolved else flash_attn

    header = read_gguf_header(path)
    shape = shape_from_header(header)
    layer_dev = {int(m[1]): m[2] for line in first if (m := _RE_LAYER_DEV.search(line))}
    model_bufs = {m[1] for line in first if (m := _RE_MODEL_BUF.search(line))}
    repack_on = "CPU_REPACK" in model_bufs
    out_dev = layer_dev.get(shape.n_layers, "CPU")
    for il in range(shape.n_layers):
        if layer_dev.get(il, "CPU") == "CPU":
            result.weights_cpu_bytes += shape.layer_weight_bytes[il]
            result.repacked_bytes += shape.layer_repack_bytes[il] if repack_on else 0
        else:
            result.weights_gpu_bytes += shape.layer_weight_bytes[il]
    result.weights_cpu_bytes += shape.token_embd_bytes + shape.other_bytes
    if out_dev == "CPU":
        result.weights_cpu_bytes += shape.output_bytes - (shape.token_embd_bytes if shape.output_tied else 0)
        result.repacked_bytes += shape.output_repack_bytes if repack_on else 0
    else:
        result.weights_gpu_bytes += shape.output_bytes
    del header

    kv_devs: list[str] = []  # the layers of the cache whose size line comes next
    for line in first:  # per cache (a sliding-window model has two, of different sizes)
        if m := _RE_KV_LAYER.search(line):
            kv_devs.append(m[2])
        elif m := _RE_KV_SIZE.search(line):
            size = int(float(m[1]) * MIB)
            gpu = int(size * sum(1 for d in kv_devs if d != "CPU") / len(kv_devs)) if kv_devs else 0
            result.kv_gpu_bytes += gpu
            result.kv_cpu_bytes += size - gpu
            kv_devs = []
    for m in (_RE_COMPUTE.search(line) for line in first):
        if m:
            result.buffers[f"compute:{m[1]}"] = float(m[2])
            size = int(float(m[2]) * MIB)
            if _is_host(m[1]):  # reserved with the rows a decode asks for: also what it touches
                result.compute_cpu_alloc_bytes += size
                result.compute_cpu_bytes += size
            else:
                result.compute_gpu_bytes += size
    for m in (_RE_OUTPUT.search(line) for line in first):
        if m:
            result.output_bytes += int(float(m[2]) * MIB)
    if not result.compute_gpu_bytes:  # the CPU backend's scratch is not in llama.cpp's figures
        opts = EstimateOptions(n_ctx, n_batch, n_ubatch, kv_type, bool(result.flash_attn), n_slots=n_slots)
        result.work_bytes = cpu_work_bytes(shape, opts, slot_cells(shape, opts))
    result.gpu_bytes = result.weights_gpu_bytes + result.kv_gpu_bytes + result.compute_gpu_bytes
    if result.weights_gpu_bytes:  # llama.cpp's buffers leave out the CUDA context, cuBLAS, its pool
        result.gpu_bytes += CUDA_OVERHEAD_BYTES
        result.process_bytes += CUDA_HOST_OVERHEAD_BYTES
    result.mmap_bytes = result.weights_cpu_bytes
    result.ram_bytes = (
        result.process_bytes + result.repacked_bytes + result.kv_cpu_bytes + result.compute_cpu_bytes
        + result.work_bytes + result.output_bytes
    )
    return result


def dry_run(
    path: str | Path, n_ctx: int, n_gpu_layers: int = 0, n_batch: int = 512, n_ubatch: int = 512,
    kv_type: str = "f16", flash_attn: bool | None = False, timeout_s: float = 300, n_slots: int = 1,
) -> DryRunResult:
    """Run the dry run in a child process (llama.cpp state never leaks into the caller).

    n_ctx is per slot (the model's context), n_slots the replica's `parallel`; flash_attn
    None is llama.cpp's "auto", what the engine uses when the model does not ask for it."""
    flash = {True: "on", False: "off", None: "auto"}[flash_attn]
    cmd = [
        sys.executable, "-m", "worker.dry_run", str(path), "--ctx", str(n_ctx),
        "--gpu-layers", str(n_gpu_layers), "--batch", str(n_batch), "--ubatch", str(n_ubatch),
        "--kv-type", kv_type, "--flash-attn", flash, "--parallel", str(n_slots), "--json",
    ]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), GGML_NO_BACKTRACE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env)
    try:
        return DryRunResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        return DryRunResult(error=f"dry run failed (rc {proc.returncode}): {proc.stderr[-1000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.dry_run", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--ctx", type=int, default=4096, help="context per slot")
    p.add_argument("--parallel", type=int, default=1, help="slots (sequences served at once), each with --ctx")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ubatch", type=int, default=512)
    p.add_argument("--kv-type", default="f16", choices=sorted(_KV_TYPES))
    p.add_argument("--flash-attn", nargs="?", const="on", default="off", choices=sorted(FLASH_CHOICES),
                   help="on, off (default) or auto (llama.cpp decides, as the engine does by default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel must be >= 1")
    r = measure_in_process(a.model, a.ctx, a.gpu_layers, a.batch, a.ubatch, a.kv_type, FLASH_CHOICES[a.flash_attn],
                           a.parallel)
    if a.json:
        print(json.dumps(asdict(r)))
    else:
        for k, v in asdict(r).items():
            print(f"{k:>24}: {v / MIB:.1f} MiB" if isinstance(v, int) and not isinstance(v, bool) and k != "n_slots"
                  else f"{k:>24}: {v}")
    return 1 if r.error else 0


if __name__ == "__main__":
    sys.exit(main())
