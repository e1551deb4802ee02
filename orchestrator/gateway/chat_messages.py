"""Chat messages as OpenAI sends them (one shape per role), and as the engine gets them.

The engine's form, one plain dict per message:
    {"role": "system" | "developer" | "user" | "assistant" | "tool",
     "content": str | None,            # text parts joined with "\\n"
     "name": str,                      # only when sent
     "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON text}}],
                                       # only on assistant messages that made calls
     "tool_call_id": str}              # only on tool messages
Nothing is renamed (a developer message stays one: the engine's template decides).

The OpenAPI document shows what is accepted: image, audio and file parts, and the fields that
take only null, are refused with a clear 400 and left out of the documented shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema

from orchestrator.gateway.request_model import NULL_ONLY, OpenAIObject, invalid, tagged, unsupported, unsupported_value


class TextPart(OpenAIObject):
    type: Literal["text"]
    text: str


class RefusalPart(OpenAIObject):
    """An assistant's earlier refusal, part of what it said: rendered as its text."""

    type: Literal["refusal"]
    refusal: str


class ImagePart(OpenAIObject):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(OpenAIObject):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(OpenAIObject):
    type: Literal["file"]
    file: dict[str, Any]


UNSUPPORTED_PARTS = {
    "image_url": "images are not supported by this model",
    "input_audio": "audio input is not supported by this model",
    "file": "file inputs are not supported by this model",
}
TEXT_PARTS_DOC = {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}
TextContent = Annotated[
    str | list[TextPart],
    WithJsonSchema({"anyOf": [{"type": "string"}, TEXT_PARTS_DOC]}),
]
UserContent = Annotated[
    str | list[tagged(TextPart, ImagePart, AudioPart, FilePart)],
    WithJsonSchema({"anyOf": [{"type": "string"}, TEXT_PARTS_DOC],
                    "description": "Text, or text parts (joined with newlines); image, audio and file parts "
                                   "are a 400 unsupported_value."}),
]
AssistantPart = tagged(TextPart, RefusalPart)


class FunctionCall(OpenAIObject):
    name: str = Field(..., min_length=1)
    arguments: str = Field(..., description="The call's arguments as JSON text, as the model produced them.")


class ToolCall(OpenAIObject):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _Message(OpenAIObject):
    def text(self) -> str | None:
        content = self.content
        if content is None or isinstance(content, str):
            return content
        return "\n".join(part.text if isinstance(part, TextPart) else part.refusal for part in content)

    def engine_message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if getattr(self, "name", None) is not None:
            out["name"] = self.name
        return out


class SystemMessage(_Message):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: UserContent
    name: str | None = None


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = Field(None, description="Null when it only made tool calls.")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="The calls it made.")
    refusal: str | None = Field(None, description="Its refusal text, used when content is null.")
    annotations: list[Any] | None = Field(
        None, description="Response-only (URL citations) that clients echo back: accepted, not shown to the model."
    )
    audio: Annotated[dict[str, Any] | None, WithJsonSchema(NULL_ONLY)] = Field(None, description="Only null.")
    function_call: Annotated[dict[str, Any] | None, WithJsonSchema(NULL_ONLY)] = Field(
        None, description="Legacy: only null (send tool_calls)."
    )

    def text(self) -> str | None:
        return self.refusal if self.content is None else super().text()

    def engine_message(self) -> dict[str, Any]:
        out = super().engine_message()
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
                for call in self.tool_calls
            ]
        return out


class ToolMessage(_Message):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str = Field(..., description="The call this answers.")

    def engine_message(self) -> dict[str, Any]:
        return {**super().engine_message(), "tool_call_id": self.tool_call_id}


ChatMessage = tagged(SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage, key="role",
                     note=" (the legacy 'function' role is not supported: send 'tool' messages)")


def check_conversation(messages: list[_Message]) -> None:
    """What one message's shape cannot say, with the exact place of the problem."""
    for index, message in enumerate(messages):
        here = f"messages[{index}]"
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            for number, part in enumerate(message.content):
                if part.type in UNSUPPORTED_PARTS:
                    raise unsupported_value(UNSUPPORTED_PARTS[part.type], f"{here}.content[{number}]")
        if isinstance(message, AssistantMessage):
            if message.audio is not None:
                raise unsupported("audio in messages is not supported by this model", f"{here}.audio")
            if message.function_call is not None:
                raise unsupported("the legacy function_call is not supported; send tool_calls", f"{here}.function_call")
            if message.content is None and not message.tool_calls and message.refusal is None:
                raise invalid("an assistant message needs content or tool_calls", f"{here}.content")
