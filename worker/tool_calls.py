"""Tool calls: the grammar that forces one (tool_choice "required" or a named function),
and reading calls out of what a model wrote, in the formats of the major families:
Hermes/Qwen `<tool_call>{...}</tool_call>`, Llama 3.x `{"name", "parameters"}`, Mistral
`[TOOL_CALLS] [{...}]`, and plain JSON `{"name", "arguments"}` (what a model without a tool
format is asked for, and what a forced call looks like in every family).

`ToolCallStream` sits between the token stream and the client: text that cannot be the
start of a call goes out at once; a call is held until it is complete and then parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from worker.errors import RequestError
from worker.generation import partial_match_length
from worker.structured import schema_grammar

MARKERS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>",), "json": ()}
_JSON_START = ("{", "[", "```")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def tool_names(tools: Sequence[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def chosen_tools(tools: Sequence[dict], tool_choice) -> list[dict]:
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return chosen
    return list(tools)


def forced_call_grammar(tools: Sequence[dict], tool_choice):
    """tool_choice "required" or {"function": {"name"}}: the output is one call, as JSON."""
    variants = []
    for tool in chosen_tools(tools, tool_choice):
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object"}
        variants.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                         "required": ["name", "arguments"]})
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return schema_grammar(schema, "tools")


# ---- reading calls -------------------------------------------------------------------


def parse_calls(text: str, fmt: str, names: Sequence[str]) -> tuple[str, list[ToolCall]]:
    """(content outside the calls, calls) from a model's whole answer; no calls: (text, [])."""
    for parser in (_PARSERS[fmt], _parse_json) if fmt != "json" else (_parse_json,):
        content, calls = parser(text)
        calls = [c for c in calls if not names or c.name in names]
        if calls:
            return content.strip(), [ToolCall(c.name, c.arguments, f"call_{uuid.uuid4().hex[:24]}") for c in calls]
    return text, []


def _call_from(obj) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str):
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _calls_from(value) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(item) for item in items]
    return calls if calls and all(calls) else []


def _json_values(text: str) -> tuple[list, int, int]:
    """JSON values one after another (separated by whitespace, ';' or ','), from the first
    '{' or '['; returns (values, start, end) of the run."""
    decoder = json.JSONDecoder()
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return [], -1, -1
    start = pos = min(starts)
    values = []
    while pos < len(text):
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            break
        values.append(value)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
    return values, start, pos


def _parse_json(text: str) -> tuple[str, list[ToolCall]]:
    stripped = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text)
    values, start, end = _json_values(stripped)
    if not values or stripped[:start].strip() or stripped[end:].strip():
        return text, []  # a call is the whole answer; JSON inside prose is prose
    calls = [c for v in values for c in _calls_from(v)]
    return ("", calls) if calls else (text, [])


def _parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls, content = [], text
    for match in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL):
        values, _, _ = _json_values(match.group(1))
        calls += [c for v in values for c in _calls_from(v)]
        content = content.replace(match.group(0), "")
    return content, calls


def _parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    head, marker, rest = text.partition("[TOOL_CALLS]")
    if not marker:
        return text, []
    values, _, _ = _json_values(rest)
    if values:
        return head, [c for v in values for c in _calls_from(v)]
    calls = []  # newer format: name[ARGS]{...}
    for match in re.finditer(r"([A-Za-z0-9_\-.]+)\[ARGS\]", rest):
        values, _, _ = _json_values(rest[match.end():])
        if values and isinstance(values[0], dict):
            calls.append(ToolCall(match.group(1), json.dumps(values[0], ensure_ascii=False)))
    return head, calls


def _parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    return _parse_json(text.replace("<|python_tag|>", ""))


_PARSERS = {"hermes": _parse_hermes, "mistral": _parse_mistral, "llama3": _parse_llama3, "json": _parse_json}


# ---- streaming -----------------------------------------------------------------------


class ToolCallStream:
    """Decides, as text arrives, what is content (sent at once) and what may be a call (held)."""

    def __init__(self, fmt: str, names: Sequence[str], forced: bool, parallel: bool = True) -> None:
        self.parallel = parallel  # False: one call at most (OpenAI's parallel_tool_calls)
        self.fmt = "json" if forced else fmt
        self.names = list(names)
        self.forced = forced
        self.markers = MARKERS[self.fmt]
        self.held = ""
        self.streaming_content = False  # decided: the answer is prose (a marker may still come)
        self.sent = ""

    def feed(self, text: str) -> str:
        """Content to send now."""
        self.held += text
        if self.forced:
            return ""
        if not self.streaming_content:
            head = self.held.lstrip()
            if not head:
                return ""
            if self._may_start_call(head):
                return ""
            self.streaming_content = True
        return self._release_content()

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls) at the end of the answer."""
        content, calls = parse_calls(self.held, self.fmt, self.names)
        self.held = ""
        return content, calls if self.parallel else calls[:1]

    def _may_start_call(self, head: str) -> bool:
        starts = (*self.markers, *_JSON_START)
        return any(head.startswith(m) or m.startswith(head) for m in starts)

    def _release_content(self) -> str:
        """Send the held text up to a call marker (or the part that could begin one)."""
        for marker in self.markers:
            at = self.held.find(marker)
            if at >= 0:
                out, self.held = self.held[:at], self.held[at:]
                self.sent += out
                return out
        keep = partial_match_length(self.held, self.markers)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        self.sent += out
        return out
