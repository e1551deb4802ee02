"""The Ollama surface through the real app and a fake cluster: NDJSON streams and whole
answers from the replica's stream, what reaches the engine, errors in Ollama's shape with the
right status, the slot released on every path, the listings and the OpenAPI document."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_gateway_fakes import (
    MODEL,
    FakeController,
    ReplicaDied,
    Script,
    app_for,
    chat_events,
    raw_asgi,
    sse,
)

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "Hi"}]
EMBEDDING = {"object": "list", "model": MODEL, "usage": {"prompt_tokens": 3, "total_tokens": 3},
             "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}]}


# handle, controller, client: tests/unit/conftest.py


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines()]


def in_flight(controller) -> int:
    return controller.replicas[(MODEL, 0)].in_flight


def text_events(*pieces: str, usage: dict | None = None) -> list[bytes]:
    out = [sse({"choices": [{"index": 0, "text": p, "finish_reason": None}]}) for p in pieces]
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage}
    return [*out, sse(last) + b"data: [DONE]\n\n"]


# ----------------------------------------------------------------------------- generations


async def test_chat_streams_ndjson_pieces_then_done_and_frees_the_slot(client, controller, handle):
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["x-homefleet-node"] == "desktop"
    objects = lines(response)
    assert [o["message"]["content"] for o in objects[:-1]] == ["Hel", "lo"]
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] == "stop"
    assert all(isinstance(objects[-1][k], int) for k in ("total_duration", "eval_duration", "prompt_eval_duration"))
    assert handle.calls[-1][0] == "serve_chat" and in_flight(controller) == 0


async def test_chat_without_streaming_is_one_object_with_the_whole_message(client, controller, handle):
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
    answer = response.json()
    assert response.headers["content-type"] == "application/json"
    assert answer["message"] == {"role": "assistant", "content": "Hello"} and answer["done"] is True
    assert response.headers["x-homefleet-node"] == "desktop" and in_flight(controller) == 0


async def test_options_and_format_reach_the_engine_as_its_sampling(client, handle):
    await client.post("/api/chat", json={"model": MODEL, "messages": USER, "format": "json", "stream": False,
                                         "options": {"temperature": 0, "num_predict": 5, "stop": ["."], "seed": 1}})
    messages, sampling = handle.calls[-1][1][:2]
    assert messages == [{"role": "user", "content": "Hi"}]
    assert (sampling["temperature"], sampling["max_tokens"], sampling["stop"], sampling["seed"]) == (0, 5, ["."], 1)
    assert sampling["response_format"] == {"type": "json_object"}


async def test_generate_uses_the_chat_template_and_raw_sends_the_prompt_as_it_is(client, handle):
    handle.will(Script(events=chat_events(" Paris")))
    templated = await client.post("/api/generate", json={"model": MODEL, "prompt": "Capital?", "system": "Be brief",
                                                         "stream": False})
    assert templated.json()["response"] == " Paris"
    assert handle.calls[-1][0] == "serve_chat" and handle.calls[-1][1][0][0] == {"role": "system",
                                                                                 "content": "Be brief"}
    handle.will(Script(events=text_events("The", " end", usage={"prompt_tokens": 4, "completion_tokens": 2,
                                                                "total_tokens": 6})))
    raw = await client.post("/api/generate", json={"model": MODEL, "prompt": "Once", "raw": True})
    objects = lines(raw)
    assert [o["response"] for o in objects] == ["The", " end", ""]
    assert (objects[-1]["prompt_eval_count"], objects[-1]["eval_count"], objects[-1]["done_reason"]) == (4, 2, "length")
    assert handle.calls[-1][0] == "serve_text" and handle.calls[-1][1][0] == "Once"


async def test_keep_alive_reaches_the_models_clock(client, controller):
    await client.post("/api/chat", json={"model": MODEL, "messages": USER, "keep_alive": "5m", "stream": False})
    assert (MODEL, "5m") in controller.touched


async def test_an_empty_chat_loads_the_model_and_keep_alive_zero_unloads_it(client, controller, handle):
    loaded = await client.post("/api/chat", json={"model": MODEL, "messages": []})
    assert loaded.json()["done_reason"] == "load" and not handle.calls
    unloaded = await client.post("/api/generate", json={"model": MODEL, "keep_alive": 0})
    assert unloaded.json() == {**unloaded.json(), "done": True, "done_reason": "unload", "response": ""}
    assert (MODEL, 0) in controller.touched


# ----------------------------------------------------------------------------- errors


async def test_an_unknown_model_is_a_404_in_ollamas_shape(client):
    response = await client.post("/api/chat", json={"model": "nope", "messages": USER})
    assert response.status_code == 404
    assert response.json()["error"].startswith("model 'nope' not found")


@pytest.mark.parametrize("body, words", [
    ({"options": {"mirostat": 2}}, "mirostat"),
    ({"options": {"num_gpu": 1}}, "num_gpu"),
    ({"options": {"num_ctx": 100_000}}, "num_ctx"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
])
async def test_what_the_engine_does_not_honour_is_a_400_naming_it(client, handle, body, words):
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER, **body})
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert words in response.json()["error"] and not handle.calls


async def test_a_body_that_is_not_json_is_a_400_in_ollamas_shape(client):
    response = await client.post("/api/generate", content=b"{not json")
    assert response.status_code == 400 and "JSON" in response.json()["error"]


async def test_the_replicas_refusal_keeps_its_status_in_ollamas_shape(client, controller, handle):
    handle.will(Script(error={"message": "prompt too long", "status": 400, "type": "invalid_request_error",
                              "code": "context_length_exceeded"}))
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER})
    assert response.status_code == 400 and response.json() == {"error": "prompt too long"}
    assert in_flight(controller) == 0


async def test_a_model_not_ready_is_a_503_with_retry_after(client, controller):
    response = await client.post("/api/chat", json={"model": "other-model", "messages": USER})
    assert response.status_code == 503 and "loading" in response.json()["error"]
    assert response.headers["retry-after"]


async def test_a_replica_dying_mid_stream_ends_it_with_an_error_line_and_frees_the_slot(client, controller, handle):
    handle.will(Script(events=chat_events("a", "b", "c"), raise_at=3, exception=ReplicaDied("actor died")))
    replica = controller.replicas[(MODEL, 0)]
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER})
    objects = lines(response)
    assert objects[0]["message"]["content"] == "a" and "error" in objects[-1] and len(objects) == 2
    assert replica.in_flight == 0 and controller.died


async def test_a_replica_dying_under_a_whole_answer_is_a_502(client, controller, handle):
    handle.will(Script(events=chat_events("a", "b"), raise_at=3, exception=ReplicaDied("actor died")))
    replica = controller.replicas[(MODEL, 0)]
    response = await client.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
    assert response.status_code == 502 and "failed" in response.json()["error"] and replica.in_flight == 0


async def test_a_client_that_leaves_a_whole_answer_cancels_it_on_the_replica(controller, handle):
    handle.will(Script(hold=True))
    body = json.dumps({"model": MODEL, "messages": USER, "stream": False}).encode()
    await raw_asgi(app_for(controller), "POST", "/api/chat", body, leave_after_s=0.3)
    assert handle.cancelled and in_flight(controller) == 0


# ----------------------------------------------------------------------------- embeddings


async def test_embed_answers_one_vector_per_input_with_counts(client, handle):
    handle.will(Script(answer=EMBEDDING))
    answer = (await client.post("/api/embed", json={"model": MODEL, "input": "hello"})).json()
    assert answer["embeddings"] == [[0.5, -0.5]] and answer["prompt_eval_count"] == 3
    assert handle.calls[-1][0] == "embed" and handle.calls[-1][1][0] == ["hello"]


async def test_the_legacy_embeddings_call_answers_one_vector(client, handle):
    handle.will(Script(answer=EMBEDDING))
    answer = (await client.post("/api/embeddings", json={"model": MODEL, "prompt": "hello"})).json()
    assert answer == {"embedding": [0.5, -0.5]}


# ----------------------------------------------------------------------------- listings


async def test_tags_list_every_model_and_ps_only_the_loaded_ones_with_their_node(client, controller):
    controller.replicas[(MODEL, 0)].info["architecture"] = "gemma3"
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == [MODEL, "other-model"]
    assert tags[0]["details"]["family"] == "gemma3"
    running = (await client.get("/api/ps")).json()["models"]
    assert [(m["name"], m["nodes"]) for m in running] == [(MODEL, ["desktop"])]
    assert running[0]["context_length"] == 2048 and running[0]["expires_at"]


async def test_show_describes_a_model_and_404s_an_unknown_one(client):
    shown = await client.post("/api/show", json={"model": MODEL})
    assert shown.status_code == 200 and shown.json()["capabilities"] == ["completion"]
    missing = await client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]


async def test_version_answers_an_ollama_version_and_head_slash_the_clis_probe(client):
    version = (await client.get("/api/version")).json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 5, 0]
    assert (await client.head("/")).status_code == 200
    assert (await client.get("/")).headers["content-type"].startswith("text/html")  # the dashboard still


def test_the_openapi_document_shows_the_ollama_operations_and_their_error_shape():
    document = app_for(FakeController()).openapi()
    chat = document["paths"]["/api/chat"]["post"]
    assert "application/x-ndjson" in chat["responses"]["200"]["content"]
    assert chat["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OllamaError"}
    for path in ("/api/tags", "/api/ps", "/api/show", "/api/generate", "/api/embed", "/api/version"):
        assert path in document["paths"]


@pytest.mark.parametrize("path, body", [
    ("/api/show", b'{"model": "x\\ud800"}'),
    ("/api/chat", b'{"model": "x\\ud800", "messages": []}'),
])
async def test_a_lone_surrogate_is_a_400_or_404_never_a_server_error(client, path, body):
    response = await client.post(path, content=body)
    assert response.status_code in (400, 404) and isinstance(response.json()["error"], str)


async def test_a_body_that_is_not_utf8_is_a_400_in_ollamas_shape(client):
    response = await client.post("/api/show", content=b"\x81\xb0\\\xb9")
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
