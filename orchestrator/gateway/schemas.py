"""OpenAI request bodies, validated at the edge. Unknown OpenAI fields are accepted and ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    # Clients send fields we do not use (logprobs, user, ...); ignoring them is what OpenAI-compatible
    # servers do. Wrong values of fields we do use are errors.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    model: str = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def sampling(self) -> dict[str, Any]:
        """What the engine needs, as plain values that cross Ray cheaply."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "temperature": 0.8 if self.temperature is None else self.temperature,
            "top_p": 0.95 if self.top_p is None else self.top_p,
            "max_tokens": self.max_tokens,
            "stop": stop,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "include_usage": bool(self.stream_options and self.stream_options.include_usage),
        }


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _newer_name_for_max_tokens(self) -> "ChatCompletionRequest":
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def engine_messages(self) -> list[dict[str, str]]:
        out = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": message.text()})
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(...)
    echo: bool = Field(False, description="Not supported: echoing the prompt back.")

    @model_validator(mode="after")
    def _openai_defaults(self) -> "CompletionRequest":
        if self.max_tokens is None:
            self.max_tokens = 16  # OpenAI's default for the legacy completions endpoint
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return value[0]
        return value


class EmbeddingRequest(_Lenient):
    model: str = Field(..., min_length=1)
    input: str | list[str] = Field(...)
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
