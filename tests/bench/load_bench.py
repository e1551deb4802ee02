"""200 concurrent clients against the demo model on loopback, for a bounded time. Prints JSON.

    python -m tests.bench.load_bench [--clients 200] [--duration 30] [--deadline 120]

`homefleet up` on this machine serves the demo model (Gemma 3 270M, `parallel` slots and
`gateway.queue_per_replica` waiting places as configured by default). Every client chats
in a loop (half of them streamed) until `--duration` is over; a 429 or 503 is waited out
as its Retry-After says (within the time left). Allowed answers: 200 (a whole answer; a
stream to its [DONE] or an error event), 429, or 503 with Retry-After; anything else is
counted as unexpected. A request not answered within `--deadline` hangs; the whole run is
cut at duration + deadline and whatever is still running then is counted as hung too.
The gateway process (`homefleet up`: gateway, controller and Ray driver) is measured
before, during (peak) and after: RSS, threads and open file descriptors; its /healthz is
timed during the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from tests.chaos_lab import chat_body, demo_model_path
from tests.support import homefleet_up, write_config

MIB = 1024**2
MODEL = "gemma"
ALLOWED = {200, 429, 503}


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[int | str] = Counter()
        self.unexpected: list[str] = []
        self.without_retry_after = 0
        self.stream_errors = 0  # an error event in a 200 stream (explicit)
        self.streams_cut = 0  # a 200 stream that ended without [DONE] or an error event
        self.hung = 0
        self.latencies_ok: list[float] = []

    def refused(self, status: int, headers) -> float:
        """A 429/503: counted; returns its Retry-After in seconds (0 if missing)."""
        retry = headers.get("retry-after")
        if not retry:
            self.without_retry_after += 1
            self.unexpected.append(f"{status} without Retry-After")
            return 0.0
        return float(retry)


async def one_request(client: httpx.AsyncClient, url: str, stream: bool, tally: Tally, deadline_s: float) -> float:
    """One chat; returns how long to wait before the next (its Retry-After, if refused)."""
    body = chat_body(MODEL, "Say hello.", max_tokens=16, stream=stream)
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline_s):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                status = response.status_code
                tally.statuses[status] += 1
                if status not in ALLOWED:
                    tally.unexpected.append(f"{status}: {(await response.aread())[:200]!r}")
                    return 1.0
                if status != 200:
                    await response.aread()
                    return tally.refused(status, response.headers)
                if not stream:
                    answer = json.loads(await response.aread())
                    if not answer.get("choices"):
                        tally.unexpected.append(f"200 without choices: {str(answer)[:200]}")
                else:
                    ended = False
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            ended = True
                            break
                        if line.startswith('data: {"error"'):
                            tally.stream_errors += 1
                            ended = True
                            break
                    if not ended:
                        tally.streams_cut += 1
                tally.latencies_ok.append(time.monotonic() - started)
                return 0.0
    except TimeoutError:
        tally.hung += 1
        tally.statuses["hung"] += 1
        return 0.0
    except httpx.HTTPError as exc:
        tally.statuses[type(exc).__name__] += 1
        tally.unexpected.append(f"{type(exc).__name__}: {exc}")
        return 1.0


async def client_loop(index: int, client: httpx.AsyncClient, url: str, until: float, tally: Tally,
                      deadline_s: float) -> None:
    stream = bool(index % 2)
    while time.monotonic() < until:
        wait_s = await one_request(client, url, stream, tally, deadline_s)
        await asyncio.sleep(min(wait_s, max(0.0, until - time.monotonic())))


def process_figures(proc: psutil.Process) -> dict:
    return {"rss_mib": round(proc.memory_info().rss / MIB, 1), "threads": proc.num_threads(),
            "open_fds": proc.num_fds()}


async def watch_gateway(url: str, proc: psutil.Process, stop: asyncio.Event, out: dict) -> None:
    """Peak RSS of the gateway process and the slowest /healthz while the load runs."""
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            out["peak_rss_mib"] = max(out.get("peak_rss_mib", 0.0), proc.memory_info().rss / MIB)
            started = time.monotonic()
            try:
                (await client.get(f"{url}/healthz")).raise_for_status()
                out["healthz_max_s"] = max(out.get("healthz_max_s", 0.0), time.monotonic() - started)
            except httpx.HTTPError as exc:
                out["healthz_failures"] = out.get("healthz_failures", 0) + 1
                out["healthz_last_error"] = repr(exc)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass


async def run_load(url: str, proc: psutil.Process, clients: int, duration_s: float, deadline_s: float) -> dict:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    watched: dict = {}
    stop = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(deadline_s, connect=30)) as client:
        watcher = asyncio.create_task(watch_gateway(url, proc, stop, watched))
        started = time.monotonic()
        until = started + duration_s
        tasks = [asyncio.create_task(client_loop(i, client, url, until, tally, deadline_s)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + deadline_s + 10)
        for task in pending:  # bounded: whatever still runs is a hang
            task.cancel()
        tally.hung += len(pending)
        elapsed = time.monotonic() - started
        stop.set()
        await watcher
    for task in done:
        if task.exception() is not None:
            tally.unexpected.append(f"client crashed: {task.exception()!r}")
    latencies = sorted(tally.latencies_ok)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed, 1),
        "requests": sum(v for k, v in tally.statuses.items() if k != "hung"),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=str)},
        "only_200_429_503_with_retry_after": not tally.unexpected and tally.without_retry_after == 0,
        "unexpected": tally.unexpected[:10],
        "refused_without_retry_after": tally.without_retry_after,
        "stream_error_events": tally.stream_errors,
        "streams_cut_silently": tally.streams_cut,
        "hung": tally.hung,
        "clients_still_running_at_cut": len(pending),
        "answered_latency_s": {
            "p50": round(statistics.median(latencies), 2),
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
            "max": round(latencies[-1], 2),
        } if latencies else None,
        "gateway_during": {"peak_rss_mib": round(watched.get("peak_rss_mib", 0.0), 1),
                           "healthz_max_s": round(watched.get("healthz_max_s", 0.0), 3),
                           "healthz_failures": watched.get("healthz_failures", 0)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds the clients keep sending")
    parser.add_argument("--deadline", type=float, default=120.0, help="a request not answered by then hangs")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hf-load-bench-"))
    config = write_config(folder / "config.yaml",
                          [{"name": MODEL, "path": demo_model_path(), "context": 1024, "chat_format": "gemma"}])
    with homefleet_up(folder, "--config", str(config), "--name", "box") as head:
        view = head.wait_for_models({MODEL: {"ready"}}, timeout_s=240)
        replica = next(m for m in view["models"] if m["name"] == MODEL)["replicas"][0]
        gateway = psutil.Process(head.popen.pid)
        warm = httpx.post(f"{head.url}/v1/chat/completions", json=chat_body(MODEL), timeout=120)
        warm.raise_for_status()
        before = process_figures(gateway)
        load = asyncio.run(run_load(head.url, gateway, args.clients, args.duration, args.deadline))
        after = process_figures(gateway)
        time.sleep(10)
        settled = process_figures(gateway)
        still_answers = httpx.post(f"{head.url}/v1/chat/completions", json=chat_body(MODEL), timeout=120).status_code
        in_flight = next(m for m in head.cluster()["models"] if m["name"] == MODEL)["in_flight"]
    result = {
        "model": Path(demo_model_path()).name,
        "slots": replica["slots"],
        **load,
        "gateway_process": {"before": before, "after": after, "after_10s": settled,
                            "rss_growth_mib": round(settled["rss_mib"] - before["rss_mib"], 1)},
        "after_load": {"chat_status": still_answers, "in_flight_left": in_flight},
        "goal": "only 200/429/503-with-Retry-After, no hang, gateway RSS back near its start",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
