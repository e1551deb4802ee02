"""Chat messages to a prompt: the model's own Jinja template (the GGUF's), else the
fallback of its family (worker/fallback_templates.py), rendered in a sandbox with the
variables Hugging Face's `apply_chat_template` passes.

What a template can render is learned the way llama.cpp does, by rendering probes: a
system message, tool definitions, assistant tool calls, tool results. What it cannot is
adapted, never dropped: a system text opens the first user turn, tools are described in
the system text, a tool call becomes the assistant's JSON, a tool result becomes a user
turn ("Result of get_weather: ..."), and turns of one role are merged where the template
wants them to alternate.

The rendered prompt keeps the spans of user-supplied text, so the engine tokenizes them as
plain text: a user who types "<start_of_turn>" gets those characters, not the control token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.fallback_templates import ARCHITECTURE_FAMILIES, BY_FAMILY

FAMILY_ALIASES = {"mistral-instruct": "mistral", "llama-3": "llama3", "gemma3": "gemma", "qwen": "chatml"}
# How a family's models write a tool call (worker/tool_calls.py parses each).
FAMILY_TOOL_FORMATS = {"chatml": "hermes", "llama3": "llama3", "mistral": "mistral", "gemma": "json"}


class TemplateError(ValueError):
    """The template refused the conversation (e.g. roles must alternate); a 400."""


@dataclass(frozen=True)
class TemplateCaps:
    system: bool
    tools: bool
    tool_calls: bool
    tool_results: bool
    developer: bool


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    user_spans: tuple[tuple[int, int], ...]  # [start, end) of user-supplied text in `text`
    add_bos: bool  # the template did not write the BOS token itself


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "gguf-template",
                 tool_format: str | None = None) -> None:
        try:
            self.compiled = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from None
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tool_format = tool_format or tool_format_of(source)
        self.caps = self._probe()

    # ---- rendering -------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        adapted, tools_for_template = adapt(list(messages), tools, self.caps)
        try:
            text = self._render(adapted, tools_for_template, add_generation_prompt)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(str(exc)) from None
        return RenderedPrompt(text, _user_spans(text, adapted), add_bos=not (self.bos_token and text.startswith(self.bos_token)))

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        return self.compiled.render(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    # ---- what it can render ------------------------------------------------------------
    def _probe(self) -> TemplateCaps:
        user = {"role": "user", "content": "probe-user-text"}
        call = {"id": "call_probe", "type": "function",
                "function": {"name": "probe_call_name", "arguments": {"probe_arg": "probe-arg-value"}}}
        tool = {"type": "function", "function": {"name": "probe_tool_name", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
        return TemplateCaps(
            system=self._shows("probe-system-text", [{"role": "system", "content": "probe-system-text"}, user]),
            tools=self._shows("probe_tool_name", [user], tools=[tool]),
            tool_calls=self._shows("probe_call_name", [user, {"role": "assistant", "content": None, "tool_calls": [call]}]),
            tool_results=self._shows("probe-tool-result", [
                user, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_probe", "name": "probe_call_name", "content": "probe-tool-result"}]),
            developer="developer" in self.source,
        )

    def _shows(self, needle: str, messages: list[dict], tools=None) -> bool:
        try:
            return needle in self._render(messages, tools, add_generation_prompt=True)
        except Exception:  # a template that refuses the probe does not support it
            return False


def tool_format_of(source: str) -> str:
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "json"


def fallback_template(family: str, bos_token: str, eos_token: str) -> ChatTemplate:
    family = FAMILY_ALIASES.get(family, family)
    return ChatTemplate(BY_FAMILY[family], bos_token, eos_token, name=f"{family} (fallback)",
                        tool_format=FAMILY_TOOL_FORMATS[family])


def family_for(configured: str | None, architecture: str) -> str | None:
    """The fallback family for a configured chat_format or an architecture (None: not ours)."""
    if configured:
        name = FAMILY_ALIASES.get(configured, configured)
        return name if name in BY_FAMILY else None
    return ARCHITECTURE_FAMILIES.get(architecture)


# ---- adapting a conversation to what the template renders ------------------------------


def describe_tools(tools: Sequence[dict]) -> str:
    """Tools in words, for a template that cannot render them (and for the JSON call format)."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return (
        "You can call these functions (their arguments are described as JSON Schema):\n"
        + "\n".join(lines)
        + '\nTo call a function, answer with only a JSON object: {"name": <function name>, "arguments": '
        "<arguments object>}, or a JSON list of such objects to call several. Otherwise answer normally."
    )


def adapt(messages: list[dict], tools: Sequence[dict] | None, caps: TemplateCaps) -> tuple[list[dict], list[dict] | None]:
    """The conversation as this template can render it, and the tools to hand it (if any)."""
    out: list[dict] = []
    for message in messages:
        m = dict(message)
        if m["role"] == "developer" and not caps.developer:
            m["role"] = "system"
        if m.get("tool_calls"):
            m["tool_calls"] = [_with_parsed_arguments(c) for c in m["tool_calls"]]
            if not caps.tool_calls:
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
                text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
                m = {"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()}
        if m["role"] == "tool" and not caps.tool_results:
            name = m.get("name") or _call_name(messages, m.get("tool_call_id"))
            m = {"role": "user", "content": f"Result of {name}:\n{m.get('content') or ''}"}
        if m.get("content") is None and not m.get("tool_calls"):
            m["content"] = ""
        out.append(m)
    tools_for_template = list(tools) if tools else None
    if tools and not caps.tools:
        out = _with_system_text(out, describe_tools(tools))
        tools_for_template = None
    if not caps.system:
        out = _system_into_first_user(out)
    return _merge_same_roles(out), tools_for_template


def _with_parsed_arguments(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # not JSON: the template gets the text
    return {**call, "function": function}


def _call_name(previous: list[dict], call_id: str | None) -> str:
    for message in reversed(previous):
        for call in message.get("tool_calls") or ():
            if call.get("id") == call_id:
                return call["function"]["name"]
    return "the tool"


def _with_system_text(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _system_into_first_user(messages: list[dict]) -> list[dict]:
    systems = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if not systems:
        return rest
    prefix = "\n\n".join(systems)
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{prefix}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": prefix}, *rest]


def _merge_same_roles(messages: list[dict]) -> list[dict]:
    """user, user -> one user turn (templates such as Gemma's want roles to alternate)."""
    out: list[dict] = []
    for m in messages:
        if out and m["role"] == out[-1]["role"] and m["role"] in ("user", "assistant") \
                and not m.get("tool_calls") and not out[-1].get("tool_calls"):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


def _user_spans(text: str, messages: list[dict]) -> tuple[tuple[int, int], ...]:
    """Where each message's own text sits in the rendered prompt, in order."""
    spans, cursor = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or not content:
            continue
        for candidate in (content, content.strip()):
            at = text.find(candidate, cursor) if candidate else -1
            if at >= 0:
                spans.append((at, at + len(candidate)))
                cursor = at + len(candidate)
                break
    return tuple(spans)


def tokenize_prompt(llama, prompt: RenderedPrompt) -> list[int]:
    """Template text with its special tokens; user text as plain text."""
    tokens: list[int] = []
    cursor = 0
    first = True
    for start, end in (*prompt.user_spans, (len(prompt.text), len(prompt.text))):
        for part, special in ((prompt.text[cursor:start], True), (prompt.text[start:end], False)):
            if part:
                tokens += llama.tokenize(part.encode("utf-8"), add_bos=first and prompt.add_bos, special=special)
                first = False
        cursor = end
    return tokens
