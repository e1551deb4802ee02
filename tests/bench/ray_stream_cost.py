"""What one Ray streaming item costs in CPU: an actor yields small bytes objects (an SSE
flush's size) to an asyncio reader, as a replica's stream reached the gateway before one
pump per replica carried them all (worker/stream_outbox.py). Prints JSON: CPU milliseconds
per item in the reader's process and in the actor's, for several stream counts and rates.

    python -m tests.bench.ray_stream_cost [--seconds 4] [--size 300]

The actor's figure includes its own idle cost over the run (a few ms a second), spread over
the items: a lower rate shows a higher per-item figure for that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time

CASES = ((8, 0.25), (8, 0.05), (1, 0.1))  # (streams, seconds between one stream's items)


def _cpu_s(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="how long each case streams")
    parser.add_argument("--size", type=int, default=300, help="bytes per item")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # a private local Ray with a token of its own
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import psutil
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=0, concurrency_groups={"streams": 16})
    class Streamer:
        def pid(self) -> int:
            return os.getpid()

        @ray.method(num_returns="streaming", concurrency_group="streams")
        def stream(self, items: int, every_s: float, size: int):
            data = b"x" * size
            for _ in range(items):
                time.sleep(every_s)
                yield data

    actor = Streamer.remote()
    reader, streamer = psutil.Process(), psutil.Process(ray.get(actor.pid.remote()))

    async def read(streams: int, items: int, every_s: float) -> int:
        async def one() -> int:
            got = 0
            async for ref in actor.stream.remote(items, every_s, args.size):
                await ref
                got += 1
            return got

        return sum(await asyncio.gather(*(one() for _ in range(streams))))

    results = []
    for streams, every_s in CASES:
        items = int(args.seconds / every_s)
        reader_0, streamer_0, started = _cpu_s(reader), _cpu_s(streamer), time.perf_counter()
        got = asyncio.run(read(streams, items, every_s))
        wall = time.perf_counter() - started
        results.append({
            "streams": streams, "items_per_s": round(got / wall, 1), "items": got,
            "reader_cpu_ms_per_item": round(1000 * (_cpu_s(reader) - reader_0) / got, 3),
            "actor_cpu_ms_per_item": round(1000 * (_cpu_s(streamer) - streamer_0) / got, 3),
        })
    ray.shutdown()
    print(json.dumps({"benchmark": "ray_stream_cost", "item_bytes": args.size, "cpus": os.cpu_count(),
                      "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
