"""The OpenAI surface: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/models`, `/v1/models/{id}`. Bodies are checked by gateway/schemas.py; the router picks
a replica; the relay carries its answer back."""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from orchestrator.gateway.openapi import answer_or_events, error_responses
from orchestrator.gateway.relay import Relay
from orchestrator.gateway.responses import ChatCompletion, Completion, EmbeddingList, ModelCard, ModelList
from orchestrator.gateway.router import Router
from orchestrator.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

if TYPE_CHECKING:
    from orchestrator.controller import Controller

MID_WAY_ERROR = 'an error mid-way is a `data: {"error": ...}` line, then the stream ends.'
CHAT_EVENTS = f"`data: {{chat.completion.chunk}}` lines, then `data: [DONE]`; {MID_WAY_ERROR}"
TEXT_EVENTS = f"`data: {{text_completion}}` lines, then `data: [DONE]`; {MID_WAY_ERROR}"
MODEL_ERRORS = (404, 502, 503)


def openai_routes(controller: Controller, router: Router, relay: Relay, created: int) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"])

    @api.post("/chat/completions", responses={**answer_or_events(ChatCompletion, CHAT_EVENTS),
                                               **error_responses(*MODEL_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """A chat answer; every role reaches the model's chat template."""
        replica = router.acquire(body.model)
        messages, sampling = body.engine_messages(), body.sampling()
        if body.stream:
            return await relay.stream(replica, lambda rid: replica.handle.stream_chat.remote(messages, sampling, rid))
        return await relay.whole(replica, lambda rid: replica.handle.chat.remote(messages, sampling, rid), request)

    @api.post("/completions", responses={**answer_or_events(Completion, TEXT_EVENTS), **error_responses(*MODEL_ERRORS)})
    async def completions(body: CompletionRequest, request: Request):
        """A text completion of one prompt."""
        replica = router.acquire(body.model)
        prompt, sampling = body.text(), body.sampling()
        if body.stream:
            return await relay.stream(replica, lambda rid: replica.handle.stream_text.remote(prompt, sampling, rid))
        return await relay.whole(replica, lambda rid: replica.handle.complete.remote(prompt, sampling, rid), request)

    @api.post("/embeddings", responses={200: {"model": EmbeddingList}, **error_responses(*MODEL_ERRORS)})
    async def embeddings(body: EmbeddingRequest, request: Request):
        """Embeddings from a model configured with `embedding: true`."""
        replica = router.acquire(body.model)
        inputs = body.inputs()
        shape = _as_base64 if body.encoding_format == "base64" else None
        return await relay.whole(replica, lambda rid: replica.handle.embed.remote(inputs, rid), request, shape)

    def card(name: str) -> dict:
        model = controller.models[name]
        state, _ = controller.model_state(name)
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "homefleet",
            "state": state,
            "nodes": sorted({r.node_name for r in controller.ready_replicas(name)}),
            "context_length": model.context,
        }

    @api.get("/models", response_model=ModelList)
    async def list_models():
        """Every configured model, with its state and the nodes serving it."""
        return {"object": "list", "data": [card(name) for name in controller.models]}

    @api.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(404))
    async def get_model(model_id: str):
        """One configured model."""
        router.check_known(model_id)
        return card(model_id)

    return api


def _as_base64(result: dict) -> dict:
    for item in result["data"]:
        item["embedding"] = base64.b64encode(struct.pack(f"<{len(item['embedding'])}f", *item["embedding"])).decode()
    return result
