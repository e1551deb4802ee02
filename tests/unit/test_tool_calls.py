"""Reading tool calls out of what models write, in each family's format, and the stream
filter that sends prose at once but holds back what may become a call."""

from __future__ import annotations

import json

import pytest

from worker.tool_calls import ToolCallStream, chosen_tools, parse_calls
from worker.errors import RequestError

NAMES = ["get_weather", "get_time"]


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # unterminated at EOS
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("json", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ("json", '```json\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n```'),
])
def test_a_call_in_the_familys_format_is_read_as_a_call(fmt, text):
    content, calls = parse_calls(text, fmt, NAMES)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_several_calls_are_read_in_order():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    assert [c.name for c in parse_calls(text, "hermes", NAMES)[1]] == ["get_weather", "get_time"]


def test_prose_before_a_hermes_call_stays_content():
    content, calls = parse_calls('Let me look.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "hermes", NAMES)
    assert content == "Let me look." and calls[0].name == "get_time"


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '{"answer": 4}',  # JSON, but not a call
    '{"name": "launch_rockets", "arguments": {}}',  # a function that was not offered
    'Here: {"name": "get_weather", "arguments": {"city": "Paris"}} as you see',  # JSON inside prose
])
def test_what_is_not_a_call_to_an_offered_tool_stays_content(text):
    assert parse_calls(text, "json", NAMES) == (text, [])


def test_named_tool_choice_must_name_an_offered_tool():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    with pytest.raises(RequestError) as err:
        chosen_tools(tools, {"type": "function", "function": {"name": "nope"}})
    assert err.value.param == "tool_choice"


def feed_all(stream: ToolCallStream, pieces: list[str]) -> tuple[list[str], str, list]:
    sent = [stream.feed(p) for p in pieces]
    rest, calls = stream.finish()
    return sent, rest, calls


def test_prose_streams_at_once_while_a_call_is_held_until_complete():
    stream = ToolCallStream("hermes", NAMES, forced=False)
    sent, rest, calls = feed_all(stream, ["Let me ", "check. <tool", '_call>{"name": "get_time", ', '"arguments": {}}', "</tool_call>"])
    assert sent == ["Let me ", "check. ", "", "", ""]
    assert rest == "" and calls[0].name == "get_time"


def test_an_answer_that_only_looked_like_a_call_is_sent_in_full_at_the_end():
    stream = ToolCallStream("json", NAMES, forced=False)
    sent, rest, calls = feed_all(stream, ['{"answer"', ": 4}"])
    assert sent == ["", ""] and rest == '{"answer": 4}' and calls == []


def test_a_forced_call_is_never_streamed_as_content():
    stream = ToolCallStream("hermes", NAMES, forced=True)
    sent, rest, calls = feed_all(stream, ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    assert sent == ["", ""] and [c.name for c in calls] == ["get_weather"]


def test_without_parallel_tool_calls_only_the_first_call_is_kept():
    text = ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    for parallel, expected in ((True, ["get_weather", "get_time"]), (False, ["get_weather"])):
        stream = ToolCallStream("hermes", NAMES, forced=False, parallel=parallel)
        stream.feed(text)
        assert [c.name for c in stream.finish()[1]] == expected
