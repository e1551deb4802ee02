"""A short measured decode on this machine: how fast a model really generates here.

`homefleet fit --measure` uses it to calibrate the bandwidth-based speed prediction for
this machine. Runs llama.cpp in a child process (`python -m worker.speed_probe PATH`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT = "The history of the lighthouse begins"


def measure_in_process(path: str, n_gpu_layers: int, n_tokens: int) -> dict:
    import llama_cpp

    from worker.engine import default_threads

    llama = llama_cpp.Llama(model_path=path, n_ctx=512, n_gpu_layers=n_gpu_layers, n_threads=default_threads(),
                            verbose=False)
    first = last = None
    count = 0
    for _ in llama.create_completion(PROMPT, max_tokens=n_tokens, temperature=0, stream=True):
        last = time.perf_counter()
        first = first or last
        count += 1
    rate = (count - 1) / (last - first) if count > 1 and last > first else None
    return {"decode_tokens_per_s": rate, "tokens": count, "n_gpu_layers": n_gpu_layers}


def measure_decode_speed(path: str, n_gpu_layers: int = 0, n_tokens: int = 32, timeout_s: float = 300) -> dict:
    cmd = [sys.executable, "-m", "worker.speed_probe", path, "--gpu-layers", str(n_gpu_layers),
           "--tokens", str(n_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"speed probe failed (rc {proc.returncode}): {proc.stderr[-500:]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.speed_probe", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    print(json.dumps(measure_in_process(a.model, a.gpu_layers, a.tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
