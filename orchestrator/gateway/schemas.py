"""OpenAI request bodies, validated at the edge: the contract with the worker's engine.

Every field OpenAI defines for these endpoints is one of:
- honoured: it reaches the engine (`engine_messages()`, `sampling()`);
- metadata: no effect on the answer (`user`, `metadata`, ...), accepted and said so in its
  description;
- not honoured: a 400 (`unsupported_parameter` / `unsupported_value`, naming it) unless it
  holds its neutral value (null, n=1, an empty logit_bias, ...).
A field OpenAI does not define is a 400 `unknown_parameter`; null is the same as absent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from orchestrator.gateway.chat_messages import ChatMessage, check_conversation
from orchestrator.gateway.output_format import (
    ResponseFormat,
    Tool,
    ToolChoice,
    check_tools,
    tool_choice_engine_form,
)
from orchestrator.gateway.request_model import (
    NULL_ONLY,
    OpenAIObject,
    OpenAIRequest,
    invalid,
    unsupported,
    unsupported_value,
)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
METADATA = "Metadata: accepted, not stored, no effect on the answer."


def only(*values: Any) -> WithJsonSchema:
    """Document the values a field takes (others are a 400) without changing how it is read."""
    return WithJsonSchema({"enum": [*values, None]})


def doc(schema: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, NULL_ONLY]})


# Field types as read (lenient enough to answer a clear 400) and as documented (what is accepted).
Stop = Annotated[str | list[str] | None, doc({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
]})]
OneOnly = Annotated[int | None, only(1)]
FalseOnly = Annotated[bool | None, only(False)]
EmptyOnly = Annotated[dict[str, float] | None, doc({"type": "object", "maxProperties": 0})]
NullOnlyObject = Annotated[dict[str, Any] | None, WithJsonSchema(NULL_ONLY)]
NullOnlyList = Annotated[list[Any] | None, WithJsonSchema(NULL_ONLY)]
NullOnlyText = Annotated[str | None, WithJsonSchema(NULL_ONLY)]
NullOnlyChoice = Annotated[str | dict[str, Any] | None, WithJsonSchema(NULL_ONLY)]
Metadata = Annotated[dict[str, str] | None, doc({
    "type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
})]
ServiceTier = Annotated[str | None, only("auto", "default")]
Modalities = Annotated[list[str] | None, doc({"type": "array", "items": {"const": "text"}})]
OnePrompt = Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(
    {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]})]
Texts = Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(
    {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]
EmptyText = Annotated[str | None, doc({"type": "string", "maxLength": 0})]
NullOnlyNumber = Annotated[int | None, WithJsonSchema(NULL_ONLY)]
NOT_SUPPORTED = "Not supported: only null."
CACHE_HINT = "A caching hint: accepted, no effect on the answer."


class StreamOptions(OpenAIObject):
    include_usage: bool | None = Field(None, description="A last chunk with the usage and no choices.")
    include_obfuscation: FalseOnly = Field(
        None, description="No obfuscation padding is added here: only false or null (true is a 400)."
    )

    @field_validator("include_obfuscation")
    @classmethod
    def _no_padding(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported_value("stream obfuscation is not supported; send false or leave it out")
        return value


KEEP_ALIVE_DOC = ("homefleet's extension, as Ollama's: how long the model stays loaded after this request: seconds, "
                  "or a duration such as 30s, 5m, 1h; -1 for ever, 0 to unload when done.")


class KeepAliveField(OpenAIRequest):
    keep_alive: Annotated[str | float | None, doc({"anyOf": [{"type": "string", "pattern": "^-?[0-9.]+(ms|s|m|h)?"
                                                                             "([0-9.]+(ms|s|m|h))*$"},
                                                              {"type": "number"}]})] = Field(
        None, description=KEEP_ALIVE_DOC)

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value):
        if value is None:
            return None
        from orchestrator.core.keep_alive import KeepAliveError, parse_keep_alive

        try:
            parse_keep_alive(value)
        except KeepAliveError as exc:
            raise invalid(str(exc), "keep_alive") from None
        return value


class SamplingFields(KeepAliveField):
    """What chat and text completions share."""

    model: str = Field(..., min_length=1, description="A model served here (GET /v1/models).")
    temperature: float | None = Field(None, ge=0, le=2, description=f"Default {DEFAULT_TEMPERATURE}.")
    top_p: float | None = Field(None, ge=0, le=1, description=f"Default {DEFAULT_TOP_P}.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    stop: Stop = Field(None, description="Up to 4 non-empty sequences that end the answer.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Same seed, same sampling.")
    stream: bool | None = Field(None, description="Answer as server-sent events (text/event-stream).")
    stream_options: StreamOptions | None = None
    n: OneOnly = Field(None, ge=1, description="Only 1: more choices per request are a 400.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: EmptyOnly = Field(None, description="Not supported: only null or {}.")
    user: str | None = Field(None, description=METADATA)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise invalid("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise invalid("a stop sequence must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise unsupported_value("only one choice per request (n=1) is supported")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise unsupported("logit_bias is not supported")
        return value

    def sampling(self) -> dict[str, Any]:
        """What the engine needs, as plain values that cross Ray cheaply."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
            "max_tokens": self.max_tokens,
            "stop": stop,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "include_usage": bool(self.stream and self.stream_options and self.stream_options.include_usage),
        }


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(None, description="Needs tools; a named function must be one of them.")
    parallel_tool_calls: bool | None = Field(None, description="Default true.")
    logprobs: bool | None = Field(None, description="Log probabilities of the answer's tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs logprobs: true.")
    metadata: Metadata = Field(None, description=METADATA)
    store: FalseOnly = Field(None, description="Nothing is stored here: only false or null (true is a 400).")
    service_tier: ServiceTier = Field(None, description="Only 'auto' or 'default'.")
    safety_identifier: str | None = Field(None, description=METADATA)
    prompt_cache_key: str | None = Field(None, description=CACHE_HINT)
    prompt_cache_retention: str | None = Field(None, description=CACHE_HINT)
    modalities: Modalities = Field(None, description="Only ['text'].")
    audio: NullOnlyObject = Field(None, description=NOT_SUPPORTED)
    prediction: NullOnlyObject = Field(None, description=NOT_SUPPORTED)
    web_search_options: NullOnlyObject = Field(None, description=NOT_SUPPORTED)
    reasoning_effort: NullOnlyText = Field(None, description=NOT_SUPPORTED)
    verbosity: NullOnlyText = Field(None, description=NOT_SUPPORTED)
    functions: NullOnlyList = Field(None, description="Legacy, not supported: only null (send tools).")
    function_call: NullOnlyChoice = Field(None, description="Legacy, not supported: only null (send tool_choice).")

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def _not_honoured(cls, value, info):
        if value is not None:
            raise unsupported(f"{info.field_name} is not supported by the models served here")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value, info):
        if value is not None:
            newer = "tools" if info.field_name == "functions" else "tool_choice"
            raise unsupported(f"the legacy {info.field_name} is not supported; send {newer}")
        return value

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported_value("completions are not stored here; send store: false or leave it out")
        return value

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "default"):
            raise unsupported_value("only the 'auto' or 'default' service tier is served here")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(m != "text" for m in value):
            raise unsupported_value("only text output is supported: send modalities ['text']")
        return value

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise invalid("at most 16 pairs, keys of up to 64 and values of up to 512 characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise invalid("max_tokens and max_completion_tokens are the same setting; send one",
                              "max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        check_tools(self.tools, self.tool_choice)
        check_conversation(self.messages)
        return self

    def engine_messages(self) -> list[dict[str, Any]]:
        return [message.engine_message() for message in self.messages]

    def sampling(self) -> dict[str, Any]:
        return {
            **super().sampling(),
            "response_format": self.response_format.engine_form() if self.response_format is not None else None,
            "tools": [tool.engine_form() for tool in self.tools] if self.tools else None,
            "tool_choice": tool_choice_engine_form(self.tool_choice),
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs,
        }


class CompletionRequest(SamplingFields):
    prompt: OnePrompt = Field(..., description="One text (or a list of one); token ids or several prompts are a 400.")
    max_tokens: int | None = Field(None, ge=1, description=f"Default {COMPLETIONS_DEFAULT_MAX_TOKENS}.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log probabilities of the most likely tokens.")
    echo: FalseOnly = Field(None, description="Not supported: only false or null.")
    best_of: OneOnly = Field(None, ge=1, description="Only 1.")
    suffix: EmptyText = Field(None, description="Not supported (insertion): only null or ''.")

    @field_validator("prompt")
    @classmethod
    def _one_text(cls, value):
        if isinstance(value, list):
            if any(not isinstance(item, str) for item in value):
                raise unsupported_value("token-id prompts are not supported; send the prompt as text")
            if len(value) != 1:
                raise unsupported_value("exactly one prompt per request is supported")
            return value[0]
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported_value("echo is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise unsupported_value("best_of > 1 is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("suffix (insertion) is not supported")
        return value

    def text(self) -> str:
        return self.prompt  # one text, after validation

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if out["max_tokens"] is None:
            out["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        out["logprobs"] = self.logprobs
        return out


class EmbeddingRequest(KeepAliveField):
    model: str = Field(..., min_length=1)
    input: Texts = Field(..., description="Text or texts; token ids are a 400.")
    encoding_format: Literal["float", "base64"] | None = Field(None, description="Default float.")
    dimensions: NullOnlyNumber = Field(None, ge=1, description="Not supported: only null (the model's own size).")
    user: str | None = Field(None, description=METADATA)

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        if isinstance(value, list) and any(not isinstance(item, str) for item in value):
            raise unsupported_value("token-id inputs are not supported; send text")
        return value

    @field_validator("dimensions")
    @classmethod
    def _native_size(cls, value: int | None) -> int | None:
        if value is not None:
            raise unsupported("dimensions is not supported: embeddings have the model's own size")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
