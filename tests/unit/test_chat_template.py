"""Every role reaches the model: templates render system, developer, tool calls and tool
results, or have them adapted; the family fallbacks render plain conversations exactly as
the reference templates do (llama-cpp-python ships the ChatML, Llama 3 and Mistral
reference templates; Gemma's turn format is written out below from its documentation)."""

from __future__ import annotations

import json

import pytest
from llama_cpp import llama_chat_format as reference

from worker.chat_template import ChatTemplate, TemplateError, adapt, describe_tools, fallback_template, tool_format_of

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WITH_TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
]


def reference_template(source: str, bos: str, eos: str) -> ChatTemplate:
    return ChatTemplate(source, bos, eos, name="reference")


@pytest.mark.parametrize("family, source, bos, eos, messages", [
    ("chatml", reference.CHATML_CHAT_TEMPLATE, "<s>", "<|im_end|>", CHAT),
    ("llama3", reference.LLAMA3_INSTRUCT_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", CHAT),
    ("mistral", reference.MISTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>", CHAT[1:]),  # the reference has no system role
])
def test_family_fallback_renders_a_plain_chat_exactly_as_the_reference_template(family, source, bos, eos, messages):
    ours = fallback_template(family, bos, eos).render(messages).text
    assert ours == reference_template(source, bos, eos).render(messages).text


def test_gemma_fallback_opens_the_first_user_turn_with_the_system_text():
    text = fallback_template("gemma", "<bos>", "<eos>").render(CHAT).text
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


@pytest.mark.parametrize("family", ["gemma", "chatml", "llama3", "mistral"])
def test_the_system_text_reaches_the_prompt_in_every_family(family):
    text = fallback_template(family, "<s>", "</s>").render(CHAT).text
    assert "You are terse." in text


def test_developer_messages_are_system_messages_for_templates_that_do_not_know_them():
    text = fallback_template("chatml", "", "").render([{"role": "developer", "content": "Be kind."}, CHAT[1]]).text
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn():
    mistral_v01 = reference_template(reference.MISTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>")
    assert not mistral_v01.caps.system
    text = mistral_v01.render(CHAT).text
    assert text.startswith("<s>[INST] You are terse.\n\nHi there [/INST]")


def test_chatml_renders_tools_calls_and_results_in_qwen_format():
    text = fallback_template("chatml", "", "").render(WITH_TOOL_TURNS, tools=[WEATHER]).text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 24C\n</tool_response><|im_end|>" in text


def test_llama3_renders_tools_in_the_first_user_turn_and_results_as_ipython():
    text = fallback_template("llama3", "<|begin_of_text|>", "<|eot_id|>").render(WITH_TOOL_TURNS, tools=[WEATHER]).text
    assert '"name": "get_weather"' in text.split("Weather in Paris?")[0]
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny, 24C<|eot_id|>" in text


def test_mistral_renders_available_tools_calls_and_results():
    text = fallback_template("mistral", "<s>", "</s>").render(WITH_TOOL_TURNS, tools=[WEATHER]).text
    assert text.startswith('<s>[AVAILABLE_TOOLS] [{"type": "function"')
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>' in text
    assert '[TOOL_RESULTS] {"content": "sunny, 24C"}[/TOOL_RESULTS]' in text


def test_gemma_has_no_tool_turns_so_they_are_adapted_not_dropped():
    template = fallback_template("gemma", "<bos>", "<eos>")
    assert (template.caps.tools, template.caps.tool_calls, template.caps.tool_results) == (False, False, False)
    text = template.render(WITH_TOOL_TURNS, tools=[WEATHER]).text
    assert describe_tools([WEATHER]) in text  # the tools, described
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Paris"}}<end_of_turn>' in text
    assert "<start_of_turn>user\nResult of get_weather:\nsunny, 24C<end_of_turn>" in text


def test_adapting_merges_turns_of_one_role_for_templates_that_want_them_to_alternate():
    caps = fallback_template("gemma", "", "").caps
    adapted, _ = adapt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None, caps)
    assert adapted == [{"role": "user", "content": "a\n\nb"}]


def test_a_template_that_refuses_the_conversation_is_a_template_error():
    with pytest.raises(TemplateError, match="alternate"):
        fallback_template("gemma", "", "").render([{"role": "assistant", "content": "first"}])


def test_user_text_spans_cover_each_message_so_typed_control_tokens_stay_text():
    prompt = fallback_template("gemma", "<bos>", "").render([{"role": "user", "content": "say <end_of_turn> now"}])
    (start, end), = prompt.user_spans
    assert prompt.text[start:end] == "say <end_of_turn> now"
    assert prompt.text[:start].endswith("<start_of_turn>user\n")


def test_the_template_runs_in_a_sandbox():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "", "")
    with pytest.raises(Exception):
        evil.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("marker, fmt", [("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                                         ("<|python_tag|>", "llama3"), ("", "json")])
def test_the_tool_call_format_is_read_from_the_template(marker, fmt):
    assert tool_format_of(f"{{{{ '{marker}' }}}}") == fmt


def test_tool_call_arguments_reach_templates_as_mappings():
    caps = fallback_template("chatml", "", "").caps
    adapted, _ = adapt(WITH_TOOL_TURNS, [WEATHER], caps)
    assert adapted[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert json.loads(CALL["function"]["arguments"]) == {"city": "Paris"}  # the caller's message is untouched
