"""The OpenAI surface through the real app and a fake cluster: what reaches the engine, what is
a 400 (and how it is named), null fields, GET /v1/models/{id}."""

from __future__ import annotations

import base64
import struct

import pytest

from tests.unit.test_gateway_fakes import (
    MODEL,
    FakeReplicaHandle,
    Script,
    text_answer,
)

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "Hi"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


# handle, controller, client: tests/unit/conftest.py


async def chat(client, **fields):
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **fields})


def sent(handle: FakeReplicaHandle) -> tuple:
    """(messages or prompt, sampling) of the last call that reached the replica."""
    return handle.calls[-1][1][:2]


# ----------------------------------------------------------------------------- what reaches the engine


async def test_every_role_reaches_the_engine_unrenamed_with_names_tool_calls_and_tool_call_ids(client, handle):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "system", "content": "You are terse.", "name": "policy"},
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]},
    ]
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert sent(handle)[0] == [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "system", "content": "You are terse.", "name": "policy"},
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]


async def test_sampling_carries_output_controls_as_plain_values(client, handle):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response = await chat(
        client, temperature=0, max_completion_tokens=7, stop="END", seed=3, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        logprobs=True, top_logprobs=3,
    )
    assert response.status_code == 200, response.text
    sampling = sent(handle)[1]
    assert sampling == {
        "temperature": 0, "top_p": 0.95, "max_tokens": 7, "stop": ["END"], "seed": 3, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "include_usage": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "logprobs": True, "top_logprobs": 3,
    }


@pytest.mark.parametrize("response_format, engine_form", [
    ({"type": "text"}, {"type": "text"}),
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "json_schema": {"name": "x"}},
     {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": None}}),
])
async def test_response_format_reaches_the_engine_in_its_plain_form(client, handle, response_format, engine_form):
    assert (await chat(client, response_format=response_format)).status_code == 200
    assert sent(handle)[1]["response_format"] == engine_form


async def test_defaults_when_nothing_is_asked(client, handle):
    assert (await chat(client)).status_code == 200
    sampling = sent(handle)[1]
    assert sampling["response_format"] is None and sampling["tools"] is None and sampling["tool_choice"] is None
    assert sampling["parallel_tool_calls"] is True and sampling["logprobs"] is False
    assert sampling["top_logprobs"] is None


async def test_explicit_null_is_the_same_as_leaving_a_field_out(client, handle):
    nulls = {field: None for field in (
        "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream", "stream_options",
        "n", "presence_penalty", "frequency_penalty", "logit_bias", "user", "response_format", "tools",
        "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "metadata", "store", "service_tier",
        "modalities", "audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "functions",
        "function_call", "safety_identifier", "prompt_cache_key")}
    messages = [{"role": "user", "content": "Hi", "name": None},
                {"role": "assistant", "content": "Hello", "name": None, "tool_calls": None, "refusal": None,
                 "audio": None, "function_call": None, "annotations": None},
                {"role": "user", "content": "Bye"}]
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **nulls})
    assert response.status_code == 200, response.text
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    await client.post("/v1/chat/completions", json={"model": MODEL, "messages": plain})
    assert handle.calls[-2][1][:2] == handle.calls[-1][1][:2]


async def test_completions_null_fields_default_and_max_tokens_defaults_to_16(client, handle):
    handle.will(Script(answer=text_answer()))
    body = {"model": MODEL, "prompt": ["The capital of France is"], "max_tokens": None, "echo": None, "suffix": None,
            "best_of": None, "logprobs": None, "stream": None, "n": None, "user": None}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    prompt, sampling = sent(handle)
    assert prompt == "The capital of France is" and sampling["max_tokens"] == 16 and sampling["logprobs"] is None


async def test_completions_logprobs_reach_the_engine_as_a_count(client, handle):
    handle.will(Script(answer=text_answer()))
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "logprobs": 2})
    assert response.status_code == 200
    assert sent(handle)[1]["logprobs"] == 2


async def test_metadata_fields_are_accepted_and_change_nothing(client, handle):
    await chat(client, temperature=0.5)
    plain = sent(handle)
    response = await chat(client, temperature=0.5, user="u-1", metadata={"team": "a"}, store=False,
                          service_tier="auto", safety_identifier="s", prompt_cache_key="k", modalities=["text"],
                          n=1, logit_bias={}, stream_options={"include_usage": True})
    assert response.status_code == 200, response.text
    assert sent(handle) == plain


# ----------------------------------------------------------------------------- what is refused, and how


@pytest.mark.parametrize("fields, param, code", [
    ({"n": 2}, "n", "unsupported_value"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"verbosity": "low"}, "verbosity", "unsupported_parameter"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ({"store": True}, "store", "unsupported_value"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "unsupported_value"),
    ({"top_k": 40}, "top_k", "unknown_parameter"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "x"}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": [""]}, "stop", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"stream": "yes"}, "stream", "invalid_value"),
])
async def test_a_field_not_honoured_is_a_400_naming_it(client, handle, fields, param, code):
    response = await chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert error["message"]
    assert handle.calls == []


@pytest.mark.parametrize("message, param, code, text", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
     "messages[0].content[0]", "unsupported_value", "images are not supported by this model"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
     "messages[0].content[0]", "unsupported_value", "audio"),
    ({"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]},
     "messages[0].content[0]", "unsupported_value", "file"),
    ({"role": "user", "content": [{"type": "video"}]}, "messages[0].content[0].type", "invalid_value", "'text'"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text", "missing_required_parameter", ""),
    ({"role": "user"}, "messages[0].content", "missing_required_parameter", ""),
    ({"role": "system", "content": None}, "messages[0].content", "invalid_value", ""),
    ({"role": "assistant"}, "messages[0].content", "invalid_value", "content or tool_calls"),
    ({"role": "tool", "content": "18 C"}, "messages[0].tool_call_id", "missing_required_parameter", ""),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[0].tool_call_id", "unknown_parameter", ""),
    ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls", "unknown_parameter", ""),
    ({"role": "system", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[0].content[0].type",
     "invalid_value", ""),
    ({"role": "function", "name": "f", "content": "x"}, "messages[0].role", "invalid_value", "'tool' messages"),
    ({"role": "wizard", "content": "x"}, "messages[0].role", "invalid_value", "'developer'"),
    ({"content": "x"}, "messages[0].role", "invalid_value", ""),
    ({"role": "assistant", "content": "x", "audio": {"id": "a"}}, "messages[0].audio", "unsupported_parameter", ""),
    ({"role": "user", "content": "x", "mood": "happy"}, "messages[0].mood", "unknown_parameter", "mood"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]},
     "messages[0].tool_calls[0].function.arguments", "invalid_value", ""),
])
async def test_a_message_the_server_cannot_honour_is_a_400_naming_where(client, message, param, code, text):
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [message]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert text in error["message"]


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ({"prompt": [1, 2, 3]}, "prompt", "unsupported_value"),
    ({"echo": True}, "echo", "unsupported_value"),
    ({"best_of": 2}, "best_of", "unsupported_value"),
    ({"suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"logprobs": 6}, "logprobs", "invalid_value"),
    ({"logprobs": 1, "top_logprobs": 1}, "top_logprobs", "unknown_parameter"),
    ({"logprobs": True}, "logprobs", "invalid_value"),
    ({"n": 3}, "n", "unsupported_value"),
])
async def test_completions_refuse_what_they_do_not_honour(client, fields, param, code):
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **fields})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


@pytest.mark.parametrize("fields, param, code", [
    ({"dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"input": [[1, 2]]}, "input", "unsupported_value"),
    ({"encoding_format": "int8"}, "encoding_format", "invalid_value"),
])
async def test_embeddings_refuse_what_they_do_not_honour(client, fields, param, code):
    response = await client.post("/v1/embeddings", json={"model": MODEL, "input": "a", **fields})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


async def test_embeddings_in_base64_are_little_endian_float32(client, handle):
    handle.will(Script(answer={"object": "list", "model": MODEL, "usage": {"prompt_tokens": 1, "total_tokens": 1},
                               "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}]}))
    response = await client.post("/v1/embeddings", json={"model": MODEL, "input": "a", "encoding_format": "base64",
                                                         "user": None, "dimensions": None})
    assert response.status_code == 200, response.text
    encoded = response.json()["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (0.5, -1.0)


@pytest.mark.parametrize("content", [b'"\\ud800"', b'"a\\udfffb"', b'[{"type": "text", "text": "\\udc00"}]'])
async def test_a_lone_surrogate_in_the_text_is_a_400_naming_where_it_is(client, handle, content):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (MODEL.encode(), content)
    response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("messages[0].content") and "surrogate" in error["message"]
    assert handle.calls == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"model": "m", "prompt": "x", "stop": ["\\ud800"]}'),
    ("/v1/embeddings", b'{"model": "m", "input": ["ok", "\\udbff"]}'),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": []}'),
    ("/v1/chat/completions", b'{"model": "m", "messages": [], "\\ud800": 1}'),
    ("/v1/chat/completions", b'{"model": "m", "messages": [], "tools": [{"type": "function", "function": '
                             b'{"name": "f", "parameters": {"description": "\\ud800"}}}]}'),
])
async def test_a_lone_surrogate_anywhere_is_a_400_never_a_server_error(client, path, body):
    response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]


async def test_a_surrogate_pair_is_text(client, handle):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}' % MODEL.encode()
    assert (await client.post("/v1/chat/completions", content=body)).status_code == 200
    assert sent(handle)[0][0]["content"] == "\N{GRINNING FACE}"


# ----------------------------------------------------------------------------- models


async def test_get_model_by_id_answers_its_card(client):
    response = await client.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200
    card = response.json()
    assert (card["id"], card["object"], card["state"], card["nodes"]) == (MODEL, "model", "ready", ["desktop"])
    listed = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in listed] == [MODEL, "other-model"] and listed[0] == card


async def test_get_unknown_model_is_an_openai_shaped_404(client):
    response = await client.get("/v1/models/gpt-4")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": f"The model 'gpt-4' does not exist. Models served here: {MODEL}, other-model.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }


async def test_a_model_not_ready_is_a_503_with_retry_after(client, controller):
    controller.states["other-model"] = ("loading", None)
    response = await client.post("/v1/chat/completions", json={"model": "other-model", "messages": USER})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["code"] == "model_loading"
