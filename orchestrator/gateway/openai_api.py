"""The OpenAI surface: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/models`, `/v1/models/{id}`. Bodies are checked by gateway/schemas.py; the router picks
a replica; the relay carries its answer back."""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from orchestrator.gateway.openapi import answer_or_events, error_responses
from orchestrator.gateway.relay import Relay, ReplicaLost
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

    async def answer(body, request: Request, stream, whole, shape=None):
        """Stream or whole answer from a replica of `body.model`, loading it first when it
        loads on demand (a stream says so with comment lines while it waits)."""
        model = body.model
        if router.needs_load(model, body.keep_alive):
            if stream is not None:
                return relay.stream_after_load(model, stream)
            await controller.wait_until_ready(model, router.load_timeout_s, gone=request.is_disconnected)
        for attempt in range(2):
            replica = router.acquire(model)
            try:
                if stream is not None:
                    return await relay.stream(replica, lambda rid, consumer: stream(replica, rid, consumer), request)
                return await relay.whole(replica, lambda rid: whole(replica, rid), request, shape)
            except ReplicaLost:
                # It died before sending anything: another replica may answer, once.
                if attempt or not controller.ready_replicas(model):
                    raise

    @api.post("/chat/completions", responses={**answer_or_events(ChatCompletion, CHAT_EVENTS),
                                               **error_responses(*MODEL_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """A chat answer; every role reaches the model's chat template."""
        messages, sampling = body.engine_messages(), body.sampling()
        return await answer(
            body, request,
            (lambda r, rid, c: r.handle.serve_chat.remote(messages, sampling, rid, c)) if body.stream else None,
            lambda r, rid: r.handle.chat.remote(messages, sampling, rid))

    @api.post("/completions", responses={**answer_or_events(Completion, TEXT_EVENTS), **error_responses(*MODEL_ERRORS)})
    async def completions(body: CompletionRequest, request: Request):
        """A text completion of one prompt."""
        prompt, sampling = body.text(), body.sampling()
        return await answer(
            body, request,
            (lambda r, rid, c: r.handle.serve_text.remote(prompt, sampling, rid, c)) if body.stream else None,
            lambda r, rid: r.handle.complete.remote(prompt, sampling, rid))

    @api.post("/embeddings", responses={200: {"model": EmbeddingList}, **error_responses(*MODEL_ERRORS)})
    async def embeddings(body: EmbeddingRequest, request: Request):
        """Embeddings from a model configured with `embedding: true`."""
        inputs = body.inputs()
        shape = _as_base64 if body.encoding_format == "base64" else None
        return await answer(body, request, None, lambda r, rid: r.handle.embed.remote(inputs, rid), shape)

    def card(name: str) -> dict:
        model = controller.models[name]
        state, _ = controller.model_state(name)
        unloads_in = controller.unloads_in_s(name) if state == "ready" else None
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "homefleet",
            "state": state,
            "nodes": sorted({r.node_name for r in controller.ready_replicas(name)}),
            "context_length": model.context,
            "load": model.load,
            "unloads_in_s": round(unloads_in) if unloads_in is not None else None,
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
