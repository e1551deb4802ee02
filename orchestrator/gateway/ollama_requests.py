"""Ollama request bodies (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
`/api/show`), validated at the edge, and what the engine gets from them.

As on the OpenAI surface, a field is honoured, or a 400 naming it: Ollama's `options` map onto
the engine's sampling (temperature, top_p, num_predict, stop, seed, penalties); an option the
engine samples with a fixed value (top_k, min_p, repeat_penalty, ...) is accepted only at that
value; options that set how a model loads (num_gpu, num_thread, ...) belong to the fleet's
config and are a 400. `format` ("json" or a JSON Schema) goes through the structured-output
path; `images` and `think` are a 400 (no vision, no thinking models).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator

from orchestrator.gateway.output_format import Tool
from orchestrator.gateway.request_model import OpenAIObject, OpenAIRequest, invalid, unsupported, unsupported_value
from orchestrator.gateway.schemas import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, KeepAliveField

# What the engine samples with whatever a request says (worker/engine.py `_params` leaves them at
# worker/generation.py's SamplingParams defaults; penalties look back 64 tokens, sampler_chain.py).
ENGINE_FIXED = {"repeat_last_n": 64, "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
# Options that say how a model loads: the fleet's config decides, per model.
LOAD_OPTIONS = ("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep")
UNTIL_CONTEXT_ENDS = (-1, -2)  # num_predict: -1 no limit, -2 fill the context


class Options(OpenAIObject):
    """Ollama's `options` that the engine honours; the others, named in ENGINE_FIXED and
    LOAD_OPTIONS, are read so that the 400 can name them."""

    temperature: float | None = Field(None, ge=0, description=f"Default {DEFAULT_TEMPERATURE}.")
    top_p: float | None = Field(None, ge=0, le=1, description=f"Default {DEFAULT_TOP_P}.")
    num_predict: int | None = Field(None, description="Most tokens to generate; -1 or -2: until the context ends.")
    stop: list[str] | None = Field(None, description="Sequences that end the answer.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(None, ge=1, description="At most the model's configured context (which it keeps).")
    top_k: int | None = Field(None, ge=0, description="Default 40; 0 keeps every token.")
    min_p: float | None = Field(None, ge=0, le=1, description="Default 0.05.")
    repeat_penalty: float | None = Field(None, gt=0, description="Default 1.0 (none), over the last 64 tokens.")
    repeat_last_n: int | None = Field(None, description=f"Only {ENGINE_FIXED['repeat_last_n']}: the engine's.")
    typical_p: float | None = Field(None, description="Only 1.0 (off).")
    tfs_z: float | None = Field(None, description="Only 1.0 (off).")
    mirostat: int | None = Field(None, description="Only 0 (off).")
    mirostat_tau: float | None = Field(None, description="No effect without mirostat.")
    mirostat_eta: float | None = Field(None, description="No effect without mirostat.")
    penalize_newline: Annotated[bool | None, WithJsonSchema({"enum": [False, None]})] = Field(
        None, description="Only false.")
    # Load-time options: a 400 (the fleet's config sets them per model).
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_thread: Any = None
    num_keep: Any = None

    @field_validator("num_predict")
    @classmethod
    def _some_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value not in UNTIL_CONTEXT_ENDS:
            raise invalid("num_predict must be at least 1, or -1 (no limit) or -2 (fill the context)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value and any(s == "" for s in value):
            raise invalid("a stop sequence must not be empty")
        return value

    @field_validator("repeat_last_n", "typical_p", "tfs_z", "mirostat")
    @classmethod
    def _engine_value_only(cls, value, info):
        fixed = ENGINE_FIXED[info.field_name]
        if value is not None and value != fixed:
            raise unsupported_value(f"options.{info.field_name} {value} is not supported: this engine samples with "
                                    f"{info.field_name} {fixed} (send {fixed} or leave it out)")
        return value

    @field_validator("penalize_newline")
    @classmethod
    def _no_newline_penalty(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported_value("options.penalize_newline is not supported; send false or leave it out")
        return value

    @field_validator(*LOAD_OPTIONS)
    @classmethod
    def _set_by_the_fleet(cls, value, info):
        if value is not None:
            raise unsupported(f"options.{info.field_name} sets how a model loads, which the fleet's config decides "
                              "per model; leave it out")
        return value

    def check_context(self, context: int) -> None:
        """num_ctx up to the model's context is served (the model keeps its own); more is a 400."""
        if self.num_ctx is not None and self.num_ctx > context:
            raise invalid(f"options.num_ctx {self.num_ctx} is more than this model's context of {context} tokens "
                          "(set per model in the fleet's config)", "options.num_ctx")

    def sampling(self) -> dict[str, Any]:
        """The engine's sampling dict (the keys openai_api.py sends)."""
        max_tokens = self.num_predict if self.num_predict not in UNTIL_CONTEXT_ENDS else None
        return {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
            "max_tokens": max_tokens,
            "stop": list(self.stop or []),
            "seed": self.seed,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            **{k: v for k, v in (("top_k", self.top_k), ("min_p", self.min_p),
                                 ("repeat_penalty", self.repeat_penalty)) if v is not None},
            "include_usage": False,
        }


def format_engine_form(value: str | dict | None) -> dict | None:
    """Ollama's `format` as the engine's response_format: "json" any JSON, an object a schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": value, "strict": True}}


Format = Annotated[str | dict[str, Any] | None, WithJsonSchema({"anyOf": [
    {"enum": ["", "json"]}, {"type": "object", "description": "A JSON Schema the answer must match."},
    {"type": "null"}]})]
def _no_images(value: list[str] | None) -> list[str] | None:
    if value:
        raise unsupported_value("images are not supported: no vision models are served here")
    return value


NoImages = Annotated[list[str] | None, AfterValidator(_no_images), WithJsonSchema({"type": "array", "maxItems": 0})]
NoThinking = Annotated[bool | str | None, WithJsonSchema({"enum": [False, None]})]


class GenerationFields(KeepAliveField):
    """What /api/chat and /api/generate share."""

    model: str = Field(..., min_length=1, description="A model served here (GET /api/tags).")
    stream: bool | None = Field(None, description="Default true: NDJSON lines, the last with `done: true`.")
    options: Options | None = None
    format: Format = Field(None, description='"json", or a JSON Schema the answer must match.')
    think: NoThinking = Field(None, description="Only false: no thinking models are served here.")
    logprobs: Annotated[bool | None, WithJsonSchema({"enum": [False, None]})] = Field(None, description="Only false.")
    top_logprobs: Annotated[int | None, WithJsonSchema({"enum": [0, None]})] = Field(None, description="Only 0.")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value):
        if isinstance(value, str) and value not in ("", "json"):
            raise invalid('format must be "json" or a JSON Schema object')
        return value

    @field_validator("think")
    @classmethod
    def _no_thinking(cls, value):
        if value not in (None, False):
            raise unsupported_value("the models served here do not think; send think: false or leave it out")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value, info):
        if value:
            raise unsupported(f"{info.field_name} is not supported on the Ollama API here; "
                              "use /v1/chat/completions with logprobs")
        return value

    @property
    def streams(self) -> bool:
        return self.stream is not False

    def sampling(self) -> dict[str, Any]:
        return {**(self.options or Options()).sampling(), "response_format": format_engine_form(self.format)}


class CallFunction(OpenAIObject):
    name: str = Field(..., min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = Field(None, description="Its place among the message's calls, as Ollama sends it.")


class MessageToolCall(OpenAIObject):
    function: CallFunction
    id: str | None = None
    type: Literal["function"] | None = None


class Message(OpenAIObject):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: NoImages = Field(None, description="Not supported: no vision models are served here.")
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant's calls.")
    tool_name: str | None = Field(None, description="On a tool message: the function whose result it is.")
    thinking: Annotated[str | None, WithJsonSchema({"type": "null"})] = Field(None, description="Only null.")

    @field_validator("thinking")
    @classmethod
    def _no_thoughts(cls, value):
        if value:
            raise unsupported("thinking is not supported: no thinking models are served here")
        return value

    def engine_message(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": call.id or f"call_{index}_{n}", "type": "function",
                 "function": {"name": call.function.name, "arguments": json.dumps(call.function.arguments)}}
                for n, call in enumerate(self.tool_calls)]
            out["content"] = self.content or None
        if self.role == "tool":
            out["tool_call_id"] = f"call_{index}"
            if self.tool_name:
                out["name"] = self.tool_name
        return out


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list, description="Empty: load the model (or unload it with "
                                                                      "keep_alive 0) and answer nothing.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (OpenAI's tool shape).")

    def engine_messages(self) -> list[dict[str, Any]]:
        """The messages as the engine takes them (OpenAI's shape). Ollama's tool results carry no
        call id: each answers a call of the latest assistant message, the one of its
        `tool_name` where given, else the next in order."""
        out: list[dict[str, Any]] = []
        calls: list[dict] = []  # the latest assistant's calls not yet answered
        for index, message in enumerate(self.messages):
            engine = message.engine_message(index)
            if message.tool_calls:
                calls = list(engine["tool_calls"])
            elif message.role == "tool" and calls:
                named = [c for c in calls if c["function"]["name"] == message.tool_name]
                call = (named or calls)[0]
                calls.remove(call)
                engine["tool_call_id"] = call["id"]
                engine.setdefault("name", call["function"]["name"])
            out.append(engine)
        return out

    def sampling(self) -> dict[str, Any]:
        tools = [tool.engine_form() for tool in self.tools] if self.tools else None
        return {**super().sampling(), "tools": tools, "tool_choice": None, "parallel_tool_calls": True,
                "logprobs": False, "top_logprobs": None}


class GenerateRequest(GenerationFields):
    prompt: str = Field("", description="Empty: load the model (or unload it with keep_alive 0) and answer nothing.")
    system: str | None = Field(None, description="A system message before the prompt (not with raw).")
    raw: bool | None = Field(None, description="true: the prompt as it is, no chat template.")
    images: NoImages = Field(None, description="Not supported: no vision models are served here.")
    suffix: Annotated[str | None, WithJsonSchema({"enum": ["", None]})] = Field(None, description="Not supported.")
    template: Annotated[str | None, WithJsonSchema({"enum": ["", None]})] = Field(
        None, description="Not supported: the model's own chat template is used.")
    context: Annotated[list[int] | None, WithJsonSchema({"type": "array", "maxItems": 0})] = Field(
        None, description="Not supported: send the conversation to /api/chat.")

    @field_validator("suffix", "template", "context")
    @classmethod
    def _not_honoured(cls, value, info):
        if value:
            why = {"suffix": "insertion (suffix) is not supported",
                   "template": "a custom template is not supported: the model's own is used",
                   "context": "context (token ids of an earlier answer) is not supported: send the conversation "
                              "to /api/chat"}[info.field_name]
            raise unsupported(why)
        return value

    @model_validator(mode="after")
    def _raw_alone(self) -> "GenerateRequest":
        if self.raw and self.system:
            raise invalid("system has no effect with raw: true (the prompt is sent as it is)", "system")
        if self.raw and self.format not in (None, ""):  # {} is a schema too
            raise unsupported_value("format needs the chat template: send raw: false", "format")
        return self

    def engine_messages(self) -> list[dict[str, Any]]:
        """The prompt through the model's chat template, as Ollama does when raw is false."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


Inputs = Annotated[str | list[str], WithJsonSchema({"anyOf": [{"type": "string"},
                                                               {"type": "array", "items": {"type": "string"}}]})]


def check_embedding_options(options: Options | None) -> None:
    """Embeddings sample nothing: of the options only num_ctx means something (checked later)."""
    for name in sorted((options.model_fields_set if options else set()) - {"num_ctx"}):
        if getattr(options, name) is not None:
            raise unsupported(f"options.{name} has no effect on embeddings; leave it out", f"options.{name}")


class EmbedRequest(KeepAliveField):
    model: str = Field(..., min_length=1)
    input: Inputs = Field(..., description="Text or texts.")
    truncate: Annotated[bool | None, WithJsonSchema({"enum": [False, None]})] = Field(
        None, description="Only false: an input longer than the model takes is a 400, never cut.")
    options: Options | None = None
    dimensions: Annotated[int | None, WithJsonSchema({"type": "null"})] = Field(
        None, description="Not supported: embeddings have the model's own size.")

    @field_validator("truncate")
    @classmethod
    def _never_cut(cls, value):
        if value:
            raise unsupported_value("truncate is not supported: inputs are never cut; send truncate: false")
        return value

    @field_validator("dimensions")
    @classmethod
    def _native_size(cls, value):
        if value is not None:
            raise unsupported("dimensions is not supported: embeddings have the model's own size")
        return value

    @field_validator("options")
    @classmethod
    def _no_sampling(cls, value):
        check_embedding_options(value)
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(KeepAliveField):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: str = Field(..., min_length=1)
    prompt: str
    options: Options | None = None

    @field_validator("options")
    @classmethod
    def _no_sampling(cls, value):
        check_embedding_options(value)
        return value


class ShowRequest(OpenAIRequest):
    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1, description="The older name of model.")
    verbose: bool | None = None

    @model_validator(mode="after")
    def _one_name(self) -> "ShowRequest":
        if not (self.model or self.name):
            raise invalid("send the model's name as model", "model")
        return self

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""
