"""The Ollama API's pure parts: request bodies and options as the engine gets them (or a 400
naming the field), the replica's SSE stream as Ollama's NDJSON objects with counts and
nanosecond durations, and the listings (/api/tags, /api/ps, /api/show) from the cluster view."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest
from pydantic import ValidationError

from orchestrator.cluster_view import ModelFileView, ModelView, ReplicaView
from orchestrator.gateway.ollama_requests import ChatRequest, EmbedRequest, GenerateRequest, Options, ShowRequest
from orchestrator.gateway.ollama_shapes import OllamaStream, fold, quantization_of, running, show, tag

MODEL = "gemma-3-270m"
USER = [{"role": "user", "content": "Hi"}]


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def chat_chunk(content=None, finish=None, usage=None, tool_calls=None) -> dict:
    delta = {} if content is None else {"content": content}
    if tool_calls:
        delta["tool_calls"] = tool_calls
    out = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return out


USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


class Clock:
    """Nanoseconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def problem(schema, **body) -> str:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    error = caught.value.errors()[0]
    return f"{error['type']}: {error['msg']}"


# ----------------------------------------------------------------------------- requests


def test_options_map_onto_the_engine_sampling_with_num_predict_as_max_tokens():
    options = Options.model_validate({"temperature": 0, "top_p": 0.5, "num_predict": 7, "stop": ["\n"], "seed": 3,
                                      "presence_penalty": 0.1, "frequency_penalty": 0.2})
    assert options.sampling() == {"temperature": 0, "top_p": 0.5, "max_tokens": 7, "stop": ["\n"], "seed": 3,
                                  "presence_penalty": 0.1, "frequency_penalty": 0.2, "include_usage": False}


@pytest.mark.parametrize("until_the_end", [-1, -2])
def test_num_predict_minus_one_or_two_generates_until_the_context_ends(until_the_end):
    assert Options(num_predict=until_the_end).sampling()["max_tokens"] is None


@pytest.mark.parametrize("option, value", [("repeat_last_n", 32), ("mirostat", 2), ("typical_p", 0.5)])
def test_an_option_the_engine_samples_with_a_fixed_value_is_a_400_naming_that_value(option, value):
    message = problem(Options, **{option: value})
    assert message.startswith("unsupported_value") and option in message


def test_an_option_at_the_engines_own_value_is_accepted():
    Options(repeat_last_n=64, mirostat=0)


def test_top_k_min_p_and_repeat_penalty_reach_the_sampling_and_are_left_out_when_unset():
    sampling = Options(top_k=20, min_p=0.0, repeat_penalty=1.1).sampling()
    assert (sampling["top_k"], sampling["min_p"], sampling["repeat_penalty"]) == (20, 0.0, 1.1)
    assert not {"top_k", "min_p", "repeat_penalty"} & set(Options().sampling())


@pytest.mark.parametrize("option, value", [("top_k", -1), ("min_p", 1.5), ("repeat_penalty", 0)])
def test_top_k_min_p_and_repeat_penalty_out_of_range_are_a_400_naming_them(option, value):
    with pytest.raises(ValidationError) as caught:
        Options.model_validate({option: value})
    assert caught.value.errors()[0]["loc"] == (option,)


@pytest.mark.parametrize("option", ["num_gpu", "num_thread", "use_mmap", "num_batch"])
def test_load_time_options_are_the_fleets_config_and_a_400(option):
    assert "fleet's config" in problem(Options, **{option: 1})


def test_an_unknown_option_is_a_400():
    assert problem(Options, flux_capacitor=1).startswith("extra_forbidden")


def test_num_ctx_above_the_models_context_is_refused_and_below_it_is_served():
    Options(num_ctx=1024).check_context(2048)
    with pytest.raises(Exception, match="more than this model's context of 2048"):
        Options(num_ctx=4096).check_context(2048)


@pytest.mark.parametrize("value, engine_form", [
    ("json", {"type": "json_object"}),
    ({"type": "object"}, {"type": "json_schema", "json_schema": {"name": "format", "schema": {"type": "object"},
                                                                 "strict": True}}),
    ("", None),
])
def test_format_goes_through_the_structured_output_path(value, engine_form):
    body = ChatRequest.model_validate({"model": MODEL, "messages": USER, "format": value})
    assert body.sampling()["response_format"] == engine_form


def test_format_other_than_json_or_a_schema_is_a_400():
    assert "json" in problem(ChatRequest, model=MODEL, messages=USER, format="yaml")


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]},
    {"messages": USER, "think": True},
    {"messages": USER, "logprobs": True},
])
def test_images_thinking_and_logprobs_are_a_400(body):
    problem(ChatRequest, model=MODEL, **body)


def test_chat_messages_reach_the_engine_with_tool_calls_as_json_text_and_tool_results_named():
    body = ChatRequest.model_validate({"model": MODEL, "tools": [], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"c": 1}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "weather"}]})
    user, assistant, tool = body.engine_messages()
    assert user == {"role": "user", "content": "Weather?"}
    assert assistant["content"] is None
    assert assistant["tool_calls"] == [{"id": "call_1_0", "type": "function",
                                        "function": {"name": "weather", "arguments": '{"c": 1}'}}]
    assert tool["name"] == "weather" and tool["content"] == "sunny" and tool["tool_call_id"] == "call_1_0"
    assert body.sampling()["tools"] is None  # the ollama client always sends a list, empty when none


def test_tool_results_answer_the_latest_assistants_calls_by_name_else_in_order():
    body = ChatRequest.model_validate({"model": MODEL, "tools": [], "messages": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "weather", "arguments": {}}}, {"function": {"name": "clock", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "clock"},
        {"role": "tool", "content": "sunny"}]})  # no tool_name: the call not yet answered
    _, _, clock, weather = body.engine_messages()
    assert (clock["tool_call_id"], clock["name"]) == ("call_1_1", "clock")
    assert (weather["tool_call_id"], weather["name"]) == ("call_1_0", "weather")


def test_generate_uses_the_chat_template_with_its_system_prompt_unless_raw():
    body = GenerateRequest(model=MODEL, prompt="Hi", system="Be brief.")
    assert body.engine_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "raw" in problem(GenerateRequest, model=MODEL, prompt="Hi", raw=True, system="x")


@pytest.mark.parametrize("field, value", [("context", [1, 2]), ("suffix", "end"), ("template", "{{ .Prompt }}")])
def test_generate_fields_not_honoured_are_a_400(field, value):
    assert problem(GenerateRequest, model=MODEL, prompt="Hi", **{field: value}).startswith("unsupported_parameter")


def test_embeddings_take_no_sampling_options_and_never_truncate():
    assert "no effect on embeddings" in problem(EmbedRequest, model=MODEL, input="x", options={"temperature": 1})
    assert "truncate" in problem(EmbedRequest, model=MODEL, input="x", truncate=True)
    assert EmbedRequest(model=MODEL, input=["a", "b"], options={"num_ctx": 512}).inputs() == ["a", "b"]


def test_show_takes_model_or_its_older_name():
    assert ShowRequest(name=MODEL).model_name == MODEL
    problem(ShowRequest)


# ----------------------------------------------------------------------------- streams


def test_a_chat_stream_becomes_message_pieces_then_a_done_object_with_counts_and_durations():
    clock = Clock()
    stream = OllamaStream("chat", MODEL, started_ns=0, load_ns=500, clock=clock, wall=lambda: 0.0)
    clock.now = 1_000
    stream.accepted()
    clock.now = 4_000
    first = stream.feed(sse(chat_chunk("")) + sse(chat_chunk("Hel")))
    clock.now = 9_000
    rest = stream.feed(sse(chat_chunk("lo")) + sse(chat_chunk(finish="length", usage=USAGE)) + sse("[DONE]"))
    assert [p["message"]["content"] for p in first + rest[:-1]] == ["Hel", "lo"]
    assert all(p["done"] is False and p["model"] == MODEL for p in first + rest[:-1])
    done = rest[-1]
    assert done["done"] is True and done["done_reason"] == "length"
    assert done["created_at"] == "1970-01-01T00:00:00Z"
    assert (done["prompt_eval_count"], done["eval_count"]) == (9, 2)
    assert (done["total_duration"], done["load_duration"], done["prompt_eval_duration"], done["eval_duration"]) == (
        9_000, 500, 3_000, 5_000)


def test_events_split_across_items_and_comment_lines_are_read_whole():
    stream = OllamaStream("generate", MODEL, started_ns=0)
    data = b": loading 40%\n\n" + sse({"choices": [{"index": 0, "text": " Paris", "finish_reason": None}]})
    out = stream.feed(data[:20]) + stream.feed(data[20:])
    assert out == [{**out[0], "response": " Paris", "done": False}]


def test_an_error_mid_stream_is_a_last_error_line():
    stream = OllamaStream("chat", MODEL, started_ns=0)
    out = stream.feed(sse(chat_chunk("Hi")) + sse({"error": {"message": "replica failed", "type": "server_error"}}))
    assert out[-1] == {"error": "replica failed"} and stream.error_status == 502


def test_tool_calls_come_as_one_message_with_parsed_arguments_and_finish_as_stop():
    stream = OllamaStream("chat", MODEL, started_ns=0)
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    body = {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    out = stream.feed(sse(chat_chunk(tool_calls=[head])) + sse(chat_chunk(tool_calls=[body]))
                      + sse(chat_chunk(finish="tool_calls", usage=USAGE)) + sse("[DONE]"))
    assert out[0]["message"]["tool_calls"] == [{"function": {"index": 0, "name": "weather",
                                                             "arguments": {"city": "Paris"}}}]
    assert out[-1]["done_reason"] == "stop"
    whole = fold(out)
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "weather" and whole["done"] is True


@pytest.mark.parametrize("arguments", ["[1, 2]", "null", '"Paris"', "{not json"])
def test_tool_call_arguments_that_are_no_json_object_end_the_answer_with_an_error(arguments):
    """Ollama's arguments are an object (its client rejects anything else): a 502 error line."""
    stream = OllamaStream("chat", MODEL, started_ns=0)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}}
    out = stream.feed(sse(chat_chunk(tool_calls=[call])) + sse(chat_chunk(finish="tool_calls", usage=USAGE))
                      + sse("[DONE]"))
    assert "error" in out[-1] and "arguments" in out[-1]["error"] and stream.error_status == 502


def test_fold_joins_the_pieces_into_one_answer_with_the_last_objects_counts():
    stream = OllamaStream("generate", MODEL, started_ns=0)
    text = [sse({"choices": [{"index": 0, "text": t, "finish_reason": None}]}) for t in ("The", " end")]
    last = sse({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": USAGE})
    whole = fold(stream.feed(b"".join(text) + last + sse("[DONE]")))
    assert whole["response"] == "The end" and whole["eval_count"] == 2 and whole["done_reason"] == "stop"


def test_fold_of_a_stream_that_never_finished_is_an_error():
    assert "error" in fold([{"response": "x", "done": False}])


def test_ndjson_closes_the_stream_it_reads_when_it_is_closed():
    closed = []

    async def events():
        try:
            yield sse(chat_chunk("a"))
            yield sse(chat_chunk("b"))
        finally:
            closed.append(True)

    async def take_one():
        lines = OllamaStream("chat", MODEL, started_ns=0).ndjson(events())
        first = await lines.__anext__()
        await lines.aclose()
        return first

    first = asyncio.run(take_one())
    assert json.loads(first)["message"]["content"] == "a" and closed == [True]


# ----------------------------------------------------------------------------- listings


def view(*replicas: ReplicaView, **fields) -> ModelView:
    file = ModelFileView(name="gemma-3-270m-it-Q4_K_M.gguf", sha256="ab" * 32, size_bytes=253_000_000)
    return ModelView(name=MODEL, path="/m/gemma.gguf", file=file, context=2048, state="ready",
                     replicas=list(replicas), **fields)


def ready(node: str, **sizes) -> ReplicaView:
    return ReplicaView(replica_id=f"{MODEL}/{node}", node=node, state="ready", total_layers=18, gpu_layers=18, **sizes)


def test_tags_list_a_model_with_its_file_size_digest_and_quantization():
    entry = tag(view(), "gemma3", "2026-01-01T00:00:00Z")
    assert (entry["name"], entry["size"], entry["digest"]) == (MODEL, 253_000_000, "ab" * 32)
    assert entry["details"]["quantization_level"] == "Q4_K_M" and entry["details"]["family"] == "gemma3"


@pytest.mark.parametrize("name, level", [("m-Q8_0.gguf", "Q8_0"), ("m.f16.gguf", "F16"), ("m-IQ4_XS.gguf", "IQ4_XS"),
                                         ("model.gguf", "")])
def test_quantization_is_read_from_the_file_name(name, level):
    assert quantization_of(name) == level


def test_ps_lists_a_loaded_model_with_its_nodes_measured_memory_and_expiry():
    entry = running(view(ready("desktop", measured_ram_bytes=100, measured_gpu_bytes=300, estimated_gpu_bytes=9),
                         ready("laptop", estimated_ram_bytes=50, estimated_gpu_bytes=0)),
                    "gemma3", unloads_in_s=60, now_s=0)
    assert entry["nodes"] == ["desktop", "laptop"]
    assert (entry["size"], entry["size_vram"]) == (450, 300)
    assert entry["replicas"][0] == {"node": "desktop", "size": 400, "size_vram": 300, "processor": "100% GPU"}
    assert entry["expires_at"] == "1970-01-01T00:01:00Z"


def test_ps_leaves_out_a_model_with_no_ready_replica_and_a_pinned_one_never_expires():
    assert running(view(ReplicaView(replica_id="x", node="desktop", state="loading")), None, 60, 0) is None
    entry = running(view(ready("desktop")), None, unloads_in_s=None, now_s=0)
    assert datetime.fromisoformat(entry["expires_at"]).year > 2200


def test_show_says_the_context_and_what_the_model_can_do():
    shown = show(view(), "gemma3", embedding=False, modified_at="2026-01-01T00:00:00Z")
    assert shown["model_info"]["gemma3.context_length"] == 2048 and shown["capabilities"] == ["completion"]
    assert "num_ctx 2048" in shown["parameters"]
    assert show(view(), None, embedding=True, modified_at="x")["capabilities"] == ["embedding"]


@pytest.mark.parametrize("unloads_in_s", [1e12, 1e300])
def test_ps_reads_a_keep_alive_past_for_ever_as_for_ever_not_an_overflow(unloads_in_s):
    entry = running(view(ready("desktop")), None, unloads_in_s=unloads_in_s, now_s=0)
    assert entry["expires_at"] == running(view(ready("desktop")), None, unloads_in_s=None, now_s=0)["expires_at"]
