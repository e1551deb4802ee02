"""Placement benchmark: 1,000 replicas on 100 nodes of mixed hardware, goal under 1 s.

Run: python tests/bench/placement_bench.py [--runs 7] [--seed 0]
Prints one JSON object: per scenario the median/min/max seconds of `place()` over the
runs, and how many replicas went whole on a GPU, split, CPU only, or nowhere.

Scenarios (same 100 nodes; seeded, so every run and machine sees the same inputs):
- "home-lab mix": mostly small and mid models, most of them fit somewhere;
- "overcommitted": big models, most fit nowhere, so every node gets a reason in numbers
  (the slowest path).
These two use a need function linear per layer (weights + KV), with a CUDA context once
any layer is on the GPU: they time placement itself.
- "catalog estimates": 1,000 replicas of the catalog's models (50 configured models of
  20 replicas, contexts 2k-32k) through `demands_for` and the real analytic estimate,
  fresh (cold) need functions every run: placement plus the estimate's cost.
`need_calls_per_replica` tells how often the estimate is asked (distinct k per replica).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.core.hardware import GIB, MIB  # noqa: E402
from orchestrator.core.memory import MemoryNeed  # noqa: E402
from orchestrator.config import ModelConfig  # noqa: E402
from orchestrator.core import catalog  # noqa: E402
from orchestrator.core.placement import GpuSnapshot, ModelDemand, NodeSnapshot, place  # noqa: E402
from orchestrator.demand import default_shape_loader, demands_for  # noqa: E402

GOAL_SECONDS = 1.0
N_NODES = 100
N_REPLICAS = 1000

# (kind, GPUs as (name, VRAM GiB), RAM GiB), drawn with these weights.
MACHINES = [
    ("desktop", [("RTX 4070 Ti", 16)], 64),
    ("laptop-1", [("GTX 1660 Ti", 6)], 64),
    ("laptop-2", [("GTX 1060", 6)], 40),
    ("workstation", [("RTX 3090", 24), ("RTX 3090", 24)], 128),
    ("gaming", [("RTX 3060", 12)], 32),
    ("mini-pc", [], 32),
    ("nas", [], 16),
    ("server", [], 256),
]
MACHINE_WEIGHTS = [15, 15, 15, 5, 15, 15, 10, 10]

# (name, weights GiB, blocks, KV MiB per block at its context), Q4_K_M-like sizes.
HOME_MODELS = [
    ("gemma-3-270m", 0.25, 18, 2),
    ("llama-3.2-1b", 0.8, 16, 8),
    ("qwen2.5-3b", 1.9, 36, 4),
    ("mistral-7b", 4.1, 32, 16),
    ("deepseek-r1-7b", 4.4, 28, 14),
    ("llama-2-13b", 7.3, 40, 25),
    ("qwen2.5-coder-14b", 8.4, 48, 16),
]
BIG_MODELS = [
    ("qwen2.5-coder-32b", 18.5, 64, 16),
    ("llama-3-70b", 40.0, 80, 20),
    ("falcon-40b", 24.0, 60, 10),
    ("llama-2-70b-q8", 68.0, 80, 20),
]


def linear_need(weights_gib: float, blocks: int, kv_mib_per_block: float, counter: Counter):
    n_layers = blocks + 1  # blocks + output layer
    layer_bytes = int(weights_gib * GIB / n_layers + kv_mib_per_block * MIB)
    cuda_context_bytes = 400 * MIB
    process_bytes = 600 * MIB

    def need(k: int) -> MemoryNeed:
        counter["need_calls"] += 1
        gpu = cuda_context_bytes + k * layer_bytes if k else 0
        return MemoryNeed(gpu_bytes=gpu, ram_bytes=process_bytes + (n_layers - k) * layer_bytes)

    return n_layers, need


def make_nodes(rng: random.Random) -> list[NodeSnapshot]:
    nodes = []
    for i in range(N_NODES):
        kind, gpus, ram_gib = rng.choices(MACHINES, MACHINE_WEIGHTS)[0]
        snapshots = tuple(
            GpuSnapshot(index, name, vram_gib * GIB, int(vram_gib * GIB * rng.uniform(0.3, 1.0)))
            for index, (name, vram_gib) in enumerate(gpus)
        )
        nodes.append(
            NodeSnapshot(
                name=f"{kind}-{i:03d}",
                alive=rng.random() > 0.03,
                ram_free_bytes=int(ram_gib * GIB * rng.uniform(0.4, 0.95)),
                ram_total_bytes=ram_gib * GIB,
                gpus=snapshots,
                model_files=None if rng.random() < 0.8 else frozenset(m[0] for m in rng.sample(HOME_MODELS, 3)),
            )
        )
    return nodes


def make_demands(rng: random.Random, catalog: list, node_names: list[str], counter: Counter) -> list[ModelDemand]:
    demands = []
    for i in range(N_REPLICAS):
        name, weights_gib, blocks, kv_mib = rng.choice(catalog)
        n_layers, need = linear_need(weights_gib * rng.uniform(0.9, 1.1), blocks, kv_mib, counter)
        roll = rng.random()
        demands.append(
            ModelDemand(
                model=f"{name}-{i:04d}" if roll > 0.3 else name,
                replica=i,
                n_layers=n_layers,
                need=need,
                pin_node=rng.choice(node_names) if roll < 0.05 else None,
                gpu_layers=rng.choice([0, 8, -1]) if 0.05 <= roll < 0.1 else None,
                keep_free_vram_bytes=512 * MIB if 0.1 <= roll < 0.15 else 0,
            )
        )
    return demands


def catalog_demands(rng: random.Random, counter: Counter) -> list[ModelDemand]:
    """50 configured catalog models x 20 replicas, each with a fresh estimate."""
    configs = [
        ModelConfig(
            name=f"m{i:02d}-{name}",
            catalog=name,
            context=rng.choice([2048, 4096, 8192, 32768]),
            replicas=N_REPLICAS // 50,
        )
        for i, name in enumerate(rng.choice(catalog.names()) for _ in range(50))
    ]
    demands = demands_for(configs, default_shape_loader)
    needs = {}
    for d in demands:  # count the estimate's calls; replicas keep sharing one function
        needs.setdefault(d.model, _counting(d.need, counter))
    return [ModelDemand(d.model, d.replica, d.n_layers, needs[d.model]) for d in demands]


def _counting(need, counter: Counter):
    def counted(k: int):
        counter["need_calls"] += 1
        return need(k)

    return counted


def run_scenario(label: str, models: list | None, runs: int, seed: int) -> dict:
    rng = random.Random(seed)
    nodes = make_nodes(rng)
    counter: Counter = Counter()
    timings = []
    result = None
    for _ in range(runs):
        demand_rng = random.Random(seed + 1)  # the same demands every run, cold estimates
        if models is None:
            demands = catalog_demands(demand_rng, counter)
        else:
            demands = make_demands(demand_rng, models, [n.name for n in nodes], counter)
        counter.clear()
        start = time.perf_counter()
        result = place(nodes, demands)
        timings.append(time.perf_counter() - start)
    kinds = Counter(a.kind for a in result.assignments)
    median = statistics.median(timings)
    return {
        "scenario": label,
        "nodes": len(nodes),
        "gpus": sum(len(n.gpus) for n in nodes),
        "replicas": len(demands),
        "runs": runs,
        "median_s": round(median, 4),
        "min_s": round(min(timings), 4),
        "max_s": round(max(timings), 4),
        "placed": len(result.assignments),
        "gpu": kinds["gpu"],
        "split": kinds["split"],
        "cpu": kinds["cpu"],
        "unplaced": len(result.unplaced),
        "need_calls_per_replica": round(counter["need_calls"] / len(demands), 1),
        "under_goal": median < GOAL_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per scenario (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated nodes and models")
    args = parser.parse_args(argv)
    scenarios = [
        run_scenario("home-lab mix", HOME_MODELS, args.runs, args.seed),
        run_scenario("overcommitted", BIG_MODELS, args.runs, args.seed),
        run_scenario("catalog estimates", None, args.runs, args.seed),
    ]
    report = {
        "benchmark": "placement",
        "goal_s": GOAL_SECONDS,
        "python": sys.version.split()[0],
        "scenarios": scenarios,
        "under_goal": all(s["under_goal"] for s in scenarios),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["under_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
