"""What the gateway answers, as models for the OpenAPI document (the endpoints send plain
JSON; these describe it). Objects stay open to more fields, as OpenAI's do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, not_found_error or server_error.")
    param: str | None = Field(None, description="The request field at fault, e.g. messages[0].content.")
    code: str | None = Field(None, description="e.g. model_not_found, unsupported_parameter, context_length_exceeded.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AnswerMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = Field(None, description="stop, length or tool_calls.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(..., description="Floats, or base64 of little-endian float32.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    state: str = Field(..., description="not_loaded, copying, downloading, loading, ready, unloading, pending or "
                       "failed.")
    nodes: list[str] = Field(..., description="Nodes where a replica of it serves now.")
    context_length: int
    load: Literal["always", "on_demand"] = Field("always", description="Loaded at start, or by its first request.")
    unloads_in_s: int | None = Field(None, description="When ready: seconds until it unloads if left idle (null: never).")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool = Field(..., description="Every model is ready or failed, and one at least is ready.")
    models: dict[str, str] = Field(..., description="Each model's state.")
