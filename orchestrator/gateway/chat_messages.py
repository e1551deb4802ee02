"""Chat messages as OpenAI sends them, and as the engine gets them (plain dicts, every role kept).

The engine's form, one dict per message:
    {"role": "system" | "developer" | "user" | "assistant" | "tool",
     "content": str | None,            # text parts joined with "\\n"
     "name": str,                      # only when sent
     "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON text}}],
                                       # only on assistant messages that made calls
     "tool_call_id": str}              # only on tool messages
Nothing is renamed (a developer message stays one: the engine's template decides).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from orchestrator.gateway.request_model import OpenAIObject, invalid, tagged, unsupported, unsupported_value

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
TEXT_ONLY_ROLES = ("system", "developer", "tool")


class TextPart(OpenAIObject):
    type: Literal["text"]
    text: str


class RefusalPart(OpenAIObject):
    """An assistant's earlier refusal, part of what it said: rendered as its text."""

    type: Literal["refusal"]
    refusal: str


class ImagePart(OpenAIObject):
    """Not supported: the models served here read text only (a 400)."""

    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(OpenAIObject):
    """Not supported (a 400)."""

    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(OpenAIObject):
    """Not supported (a 400)."""

    type: Literal["file"]
    file: dict[str, Any]


ContentPart = tagged(TextPart, RefusalPart, ImagePart, AudioPart, FilePart)
UNSUPPORTED_PARTS = {
    "image_url": "images are not supported by this model",
    "input_audio": "audio input is not supported by this model",
    "file": "file inputs are not supported by this model",
}


class FunctionCall(OpenAIObject):
    name: str = Field(..., min_length=1)
    arguments: str = Field(..., description="The call's arguments as JSON text, as the model produced them.")


class ToolCall(OpenAIObject):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(OpenAIObject):
    role: Role = Field(..., description="'function' (the legacy role) is a 400: send 'tool' messages.")
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or parts whose text is joined with newlines; image, audio and file parts are a 400."
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Assistant messages only: the calls it made.")
    tool_call_id: str | None = Field(None, description="Tool messages only (required there): the call answered.")
    refusal: str | None = Field(None, description="Assistant messages: its refusal text, used when content is null.")
    annotations: list[Any] | None = Field(
        None, description="Response-only (URL citations) that clients echo back: accepted and not shown to the model."
    )
    audio: dict[str, Any] | None = Field(None, description="Not supported: only null.")
    function_call: dict[str, Any] | None = Field(None, description="Legacy, not supported: only null (use tool_calls).")

    @field_validator("role")
    @classmethod
    def _no_legacy_function_role(cls, role: str) -> str:
        if role == "function":
            raise unsupported_value("the legacy 'function' role is not supported; send the result as a 'tool' message "
                                    "with its tool_call_id")
        return role

    def text(self) -> str | None:
        if self.content is None:
            return self.refusal if self.role == "assistant" else None
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)

    def engine_message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in self.tool_calls
            ]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out


def check_conversation(messages: list[ChatMessage]) -> None:
    """What only the whole list can tell, with the exact place of the problem."""
    for index, message in enumerate(messages):
        here = f"messages[{index}]"
        if message.audio is not None:
            raise unsupported("audio in messages is not supported by this model", f"{here}.audio")
        if message.function_call is not None:
            raise unsupported("the legacy function_call is not supported; send tool_calls", f"{here}.function_call")
        if isinstance(message.content, list):
            _check_parts(message, here)
        if message.role == "assistant":
            if message.content is None and not message.tool_calls and message.refusal is None:
                raise invalid("an assistant message needs content or tool_calls", f"{here}.content")
        elif message.content is None:
            raise invalid(f"a {message.role} message needs content", f"{here}.content")
        if message.tool_calls is not None and message.role != "assistant":
            raise invalid("only assistant messages carry tool_calls", f"{here}.tool_calls")
        if message.role == "tool" and not message.tool_call_id:
            raise invalid("a tool message needs the tool_call_id of the call it answers", f"{here}.tool_call_id")
        if message.role != "tool" and message.tool_call_id is not None:
            raise invalid("only tool messages carry a tool_call_id", f"{here}.tool_call_id")
        if message.refusal is not None and message.role != "assistant":
            raise invalid("only assistant messages carry a refusal", f"{here}.refusal")


def _check_parts(message: ChatMessage, here: str) -> None:
    for index, part in enumerate(message.content):
        where = f"{here}.content[{index}]"
        if part.type in UNSUPPORTED_PARTS:
            raise unsupported_value(UNSUPPORTED_PARTS[part.type], where)
        if part.type == "refusal" and message.role != "assistant":
            raise invalid("only assistant messages hold refusal parts", where)
        if part.type != "text" and message.role in TEXT_ONLY_ROLES:
            raise invalid(f"a {message.role} message holds text parts only", where)
