"""Faults under traffic on the two-machine loopback lab (tests/chaos_lab.py). Prints JSON.

    python -m tests.bench.fault_bench [--clients 4] [--fast-health-check] [--wait-for-nodes-s S]

The demo model (Gemma 3 270M) runs whole on laptop-1's card; a few clients chat with it
all along (streamed and whole, in turn; a 503's Retry-After is waited out, at most 5 s).
Three faults, one after the other:
- replica_sigkill: its replica process is SIGKILLed;
- node_sigstop: every process of laptop-1 is SIGSTOPped (the lid shut), then SIGCONTed
  (it wakes up) once the desktop serves the model;
- node_killed: every process of laptop-1 is SIGKILLed (power cut); then it boots again (a
  new `homefleet join`).
For each: seconds from the fault to the model answering again (a probe chats until a 200;
goal under 20 s), and for the node faults the seconds from the wake-up or boot until the
laptop is back and until the model is back on it. Every request the clients started in a
fault's window is counted by how it ended: answered (2xx, a stream to its [DONE]), an
explicit error (an error status with its error body, 429/503 with Retry-After, or an
error event in a stream), or lost silently (anything else: a hang, a cut connection, a
stream that stops without [DONE] or error; goal 0). At the end: duplicate node records in
/api/cluster (a machine shown twice; goal 0). `crash_events`: the model's `crashed` events in a
fault's window (what its restart backoff counted; a node's fault is not the model's).

Ray's health check is the product's default (1 s x 5) unless --fast-health-check (0.5 s x 4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from orchestrator.ray_cluster import health_check_env
from tests.chaos_lab import (
    FAST_HEALTH_CHECK,
    QUIET_ABORT,
    Outcome,
    classify_request,
    duplicate_node_records,
    freeze,
    lab_models,
    node_records,
    power_off,
    ready_on,
    replica_pids,
    thaw,
    two_machine_lab,
    wait_until,
)
from tests.support import child_env

MODEL = "gemma"
GOAL_ANSWERING_AGAIN_S = 20.0
RETRY_AFTER_CAP_S = 5.0  # a client waits what a 503 asks, at most this
SETTLE_S = 3.0  # traffic counted after recovery, before the next fault


class Traffic:
    """`clients` threads chatting with the model until stopped; every outcome kept."""

    def __init__(self, url: str, clients: int, timeout_s: float = 60) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        stream = bool(index % 2)
        while not self._stop.is_set():
            outcome = classify_request(self.url, MODEL, stream=stream, timeout_s=self.timeout_s)
            with self._lock:
                self.outcomes.append(outcome)
            stream = not stream
            time.sleep(min(max(0.2, outcome.retry_after_s or 0.0), RETRY_AFTER_CAP_S))  # as a polite client

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 30)

    def started_between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]


def answering_again_s(url: str, since: float, timeout_s: float = 180) -> float | None:
    """Seconds from `since` until a chat is answered (probing every 0.25 s)."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        outcome = classify_request(url, MODEL, stream=False, timeout_s=60, max_tokens=1)
        if outcome.kind == "ok":
            return round(outcome.ended - since, 2)
        time.sleep(0.25)
    return None


def tally(outcomes: list[Outcome]) -> dict:
    kinds = Counter(o.kind for o in outcomes)
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "answered": kinds["ok"],
        "explicit_errors": kinds["error_status"] + kinds["error_event"],
        "error_events_mid_stream": kinds["error_event"],
        "lost_silently": kinds["lost"],
        "statuses": dict(sorted(statuses.items())),
        "lost_examples": [o.detail for o in outcomes if o.kind == "lost"][:5],
        "error_examples": sorted({o.detail[:120] for o in outcomes if o.kind.startswith("error")})[:5],
    }


def where(head) -> str | None:
    return ready_on(head.cluster(), MODEL)


def model_home(head, timeout_s: float = 180) -> None:
    wait_until(lambda: where(head) == "laptop-1", timeout_s, f"{MODEL} ready on laptop-1")


def back_and_home(head, since: float, old_node_id: str | None) -> dict:
    """After a wake-up or a boot: seconds until laptop-1 is alive again (a new Ray node) and
    until the model is back on it."""
    def alive_again():
        return any(r["state"] == "alive" and r["ray_node_id"] != old_node_id
                   for r in node_records(head.cluster(), "laptop-1"))

    wait_until(alive_again, 180, "laptop-1 back")
    rejoined_s = time.monotonic() - since
    model_home(head, 180)
    return {"laptop_back_s": round(rejoined_s, 2), "model_back_on_laptop_s": round(time.monotonic() - since, 2)}


def crashes_since(head, wall: float) -> int:
    """`crashed` events of the model since `wall` (time.time()): what its backoff counted."""
    return sum(1 for e in head.cluster()["events"] if e["kind"] == "crashed" and e["model"] == MODEL
               and e["at"] >= wall)


def laptop_id(head) -> str | None:
    return next((r["ray_node_id"] for r in node_records(head.cluster(), "laptop-1") if r["state"] == "alive"), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="clients chatting during the faults")
    parser.add_argument("--fast-health-check", action="store_true", help="Ray's health check at 0.5 s x 4")
    parser.add_argument("--wait-for-nodes-s", type=float, default=None,
                        help="cluster.wait_for_nodes_s of the lab (the config's default when not given)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hf-fault-bench-"))
    health = FAST_HEALTH_CHECK if args.fast_health_check else {}
    env = child_env(**health, **QUIET_ABORT)
    models = lab_models(folder)
    gemma_path = next(m["path"] for m in models if m["name"] == MODEL)
    results: dict[str, dict] = {}
    with two_machine_lab(folder, models, env=env, wait_for_nodes_s=args.wait_for_nodes_s) as lab:
        lab_started = time.monotonic()
        head = lab.head
        model_home(head, 240)
        traffic = Traffic(head.url, args.clients)
        traffic.start()
        try:
            time.sleep(SETTLE_S)
            # 1. The replica process is killed.
            start, wall = time.monotonic(), time.time()
            (pid,) = replica_pids(lab.laptop, gemma_path)
            psutil.Process(pid).kill()
            fault_at = time.monotonic()
            again = answering_again_s(head.url, fault_at)
            model_home(head)
            time.sleep(SETTLE_S)
            results["replica_sigkill"] = {"answering_again_s": again, "crash_events": crashes_since(head, wall),
                                          **tally(traffic.started_between(start - SETTLE_S, time.monotonic()))}

            # 2. The laptop sleeps, then wakes.
            start, wall = time.monotonic(), time.time()
            old = laptop_id(head)
            stopped = freeze(lab.laptop)
            fault_at = time.monotonic()
            sigstop_after_start_s = fault_at - lab_started
            try:
                again = answering_again_s(head.url, fault_at)
                served_by = where(head)
                time.sleep(SETTLE_S)
            finally:
                thaw(stopped)
            woke_at = time.monotonic()
            back = back_and_home(head, woke_at, old)
            time.sleep(SETTLE_S)
            results["node_sigstop_sigcont"] = {
                "answering_again_s": again, "served_meanwhile_by": served_by,
                "asleep_s": round(woke_at - fault_at, 2), "fault_s_after_lab_up": round(sigstop_after_start_s, 1),
                "crash_events": crashes_since(head, wall),
                **back,
                **tally(traffic.started_between(start - SETTLE_S, time.monotonic())),
            }

            # 3. The laptop loses power, then boots again.
            start, wall = time.monotonic(), time.time()
            old = laptop_id(head)
            power_off(lab.laptop)
            fault_at = time.monotonic()
            killed_after_start_s = fault_at - lab_started
            again = answering_again_s(head.url, fault_at)
            served_by = where(head)
            time.sleep(SETTLE_S)
            booted_at = time.monotonic()
            lab.rejoin_laptop(timeout_s=180)
            back = back_and_home(head, booted_at, old)
            time.sleep(SETTLE_S)
            results["node_killed"] = {
                "answering_again_s": again, "served_meanwhile_by": served_by,
                "fault_s_after_lab_up": round(killed_after_start_s, 1), "crash_events": crashes_since(head, wall),
                **back,
                **tally(traffic.started_between(start - SETTLE_S, time.monotonic())),
            }
        finally:
            traffic.stop()
        view = head.cluster()
    everything = tally(traffic.outcomes)
    slowest = max((r["answering_again_s"] or float("inf")) for r in results.values())
    result = {
        "model": Path(gemma_path).name,
        "health_check": {**health_check_env(), **health},
        "clients": args.clients,
        "wait_for_nodes_s": args.wait_for_nodes_s if args.wait_for_nodes_s is not None else "config default",
        "faults": results,
        "all_requests": {k: everything[k] for k in ("requests", "answered", "explicit_errors", "lost_silently",
                                                    "statuses")},
        "requests_lost_silently": everything["lost_silently"],
        "duplicate_node_records": duplicate_node_records(view),
        "nodes_at_end": sorted(f"{n['name']}:{n['state']}" for n in view["nodes"]),
        "goals": {
            "answering_again_under_s": GOAL_ANSWERING_AGAIN_S,
            "answering_again_met": slowest < GOAL_ANSWERING_AGAIN_S,
            "lost_silently_met": everything["lost_silently"] == 0,
            "duplicate_node_records_met": duplicate_node_records(view) == 0,
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
