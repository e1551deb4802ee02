"""The Ollama surface: `/api/chat`, `/api/generate`, `/api/embed` (and the legacy
`/api/embeddings`), `/api/tags`, `/api/ps`, `/api/show`, `/api/version` and `HEAD /`, so that the official
`ollama` client and the tools built on it (Home Assistant, Open WebUI's Ollama connection)
work unchanged.

The same machinery as the OpenAI surface: the router picks a replica (loading the model first
when it loads on demand; `keep_alive` as there), the relay carries the answer and frees the
slot on every path. A generation always streams from the replica; the stream becomes NDJSON
(gateway/ollama_shapes.py), or one object when the request says `stream: false`. Errors are
Ollama's `{"error": "..."}`, with the status the OpenAI surface would give; mid-stream, a last
line `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from orchestrator.core.keep_alive import parse_keep_alive
from orchestrator.gateway.errors import validation_error_body
from orchestrator.gateway.ollama_requests import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    GenerationFields,
    ShowRequest,
)
from orchestrator.gateway.ollama_shapes import (
    OllamaStream,
    done_without_answer,
    error_line,
    fold,
    running,
    show,
    tag,
    timestamp,
)
from orchestrator.gateway.relay import DISCONNECT_POLL_S, EventStream, Relay, ReplicaLost
from orchestrator.gateway.router import Router
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller

NDJSON = "application/x-ndjson"
# The Ollama API this surface follows: clients check it before using newer fields.
OLLAMA_API_VERSION = "0.12.6"
NODE_HEADERS = ("x-homefleet-node", "x-homefleet-replica")


class OllamaError(BaseModel):
    error: str


def ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # Error text can quote what a client sent: keep it encodable (a lone surrogate becomes '?').
    text = message.encode("utf-8", "replace").decode("utf-8")
    return JSONResponse(error_line(text), status_code=status, headers=headers)


class OllamaRoute(APIRoute):
    """Every error of an Ollama operation in Ollama's shape, `{"error": "..."}`: a body that does
    not parse or validate (400), a RequestError raised (its status), an OpenAI-shaped error
    answered by the relay (its status and Retry-After kept)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except RequestValidationError as exc:
                return ollama_error(400, validation_error_body(list(exc.errors()))["error"]["message"])
            except HTTPException as exc:  # a body FastAPI cannot read (not UTF-8)
                return ollama_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
            except RequestError as exc:
                retry = {"Retry-After": str(exc.retry_after_s or 2)} if exc.status == 503 else None
                return ollama_error(exc.status, exc.message, retry)
            return _in_ollama_shape(response)

        return route


def _in_ollama_shape(response: Response) -> Response:
    if response.status_code < 400 or not isinstance(response, JSONResponse):
        return response
    error = json.loads(response.body).get("error")
    if not isinstance(error, dict):
        return response
    retry = response.headers.get("retry-after")
    return ollama_error(response.status_code, error.get("message") or "request failed",
                        {"Retry-After": retry} if retry else None)


def _errors(*statuses: int) -> dict:
    return {status: {"model": OllamaError, "description": "Ollama's error shape."} for status in statuses}


GENERATION_ANSWER = {200: {"description": 'NDJSON objects (application/x-ndjson), the last with `"done": true` '
                                          "and the counts and durations (ns); with `stream: false`, that last "
                                          "object with the whole answer. A mid-stream error is a last "
                                          '`{"error": ...}` line.',
                           "content": {NDJSON: {"schema": {"type": "object"}}}}}


def ollama_routes(controller: Controller, router: Router, relay: Relay, started_at: float,
                  clock=time.monotonic_ns) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["Ollama"], route_class=OllamaRoute)
    modified_at = timestamp(started_at)

    def known(model: str) -> None:
        if model not in controller.models:
            served = ", ".join(sorted(controller.models)) or "none"
            raise RequestError(f"model '{model}' not found (served here: {served})", status=404,
                               param="model", code="model_not_found")

    def architecture(model: str) -> str | None:
        return next((r.info["architecture"] for r in controller.ready_replicas(model) if r.info.get("architecture")),
                    None)

    def check_context(body) -> None:
        if body.options is not None:
            try:
                body.options.check_context(controller.models[body.model].context)
            except PydanticCustomError as exc:
                raise RequestError(exc.message(), param="options.num_ctx") from None

    async def loaded(body, request: Request) -> int:
        """Nanoseconds spent waiting for an on-demand load (0: it was loaded)."""
        started = clock()
        if not router.needs_load(body.model, body.keep_alive):
            return 0
        await controller.wait_until_ready(body.model, router.load_timeout_s, gone=request.is_disconnected)
        return clock() - started

    async def on_a_replica(model: str, send):
        for attempt in range(2):
            replica = router.acquire(model)
            try:
                return await send(replica)
            except ReplicaLost:
                # It died before sending anything: another replica may answer, once.
                if attempt or not controller.ready_replicas(model):
                    raise

    async def generation(body: GenerationFields, request: Request, kind: str, start, nothing_to_answer: bool):
        started = clock()
        known(body.model)
        check_context(body)
        if nothing_to_answer:  # Ollama's way to load a model, or to unload it (keep_alive 0)
            unload = body.keep_alive is not None and parse_keep_alive(body.keep_alive) == 0
            if unload:
                controller.touch(body.model, 0)
            else:
                await loaded(body, request)
            return done_without_answer(kind, body.model, "unload" if unload else "load", time.time())
        stream = OllamaStream(kind, body.model, started, await loaded(body, request), clock=clock)
        response = await on_a_replica(body.model, lambda replica: relay.stream(
            replica, lambda rid, consumer: start(replica, rid, consumer), request, transform=stream.ndjson, media_type=NDJSON))
        if not isinstance(response, EventStream):
            return response  # the replica refused it (in Ollama's shape by the route)
        stream.accepted()
        return response if body.streams else await _folded(response, stream, request)

    @api.post("/chat", responses={**GENERATION_ANSWER, **_errors(400, 404, 502, 503)})
    async def chat(body: ChatRequest, request: Request):
        """A chat answer, streamed as NDJSON unless `stream: false`."""
        messages, sampling = body.engine_messages(), body.sampling()
        return await generation(body, request, "chat",
                                lambda r, rid, c: r.handle.serve_chat.remote(messages, sampling, rid, c),
                                nothing_to_answer=not body.messages)

    @api.post("/generate", responses={**GENERATION_ANSWER, **_errors(400, 404, 502, 503)})
    async def generate(body: GenerateRequest, request: Request):
        """An answer to one prompt, through the model's chat template (`raw: true`: the prompt as it is)."""
        sampling = body.sampling()
        if body.raw:
            prompt = body.prompt
            start = lambda r, rid, c: r.handle.serve_text.remote(prompt, sampling, rid, c)  # noqa: E731
        else:
            messages = body.engine_messages()
            start = lambda r, rid, c: r.handle.serve_chat.remote(messages, sampling, rid, c)  # noqa: E731
        return await generation(body, request, "generate", start, nothing_to_answer=not body.prompt)

    async def embeddings(body, request: Request, inputs: list[str], shape):
        started = clock()
        known(body.model)
        check_context(body)
        load_ns = await loaded(body, request)

        def answer(result: dict) -> dict:
            return shape(result, {"model": body.model, "total_duration": clock() - started, "load_duration": load_ns,
                                  "prompt_eval_count": result["usage"]["prompt_tokens"]})

        return await on_a_replica(body.model, lambda replica: relay.whole(
            replica, lambda rid: replica.handle.embed.remote(inputs, rid), request, answer))

    @api.post("/embed", responses={200: {"description": "`embeddings`: one vector per input."},
                                   **_errors(400, 404, 502, 503)})
    async def embed(body: EmbedRequest, request: Request):
        """Embeddings from a model configured with `embedding: true`."""
        return await embeddings(body, request, body.inputs(), lambda result, counts: {
            **counts, "embeddings": [item["embedding"] for item in result["data"]]})

    @api.post("/embeddings", responses={200: {"description": "`embedding`: the prompt's vector."},
                                        **_errors(400, 404, 502, 503)})
    async def embeddings_legacy(body: EmbeddingsRequest, request: Request):
        """The older embeddings call: one prompt, one vector."""
        return await embeddings(body, request, [body.prompt], lambda result, counts: {
            "embedding": result["data"][0]["embedding"]})

    @api.get("/tags", responses={200: {"description": "`models`: every model served here, loaded or not."}})
    async def tags():
        """The models served here (Ollama's local models)."""
        return {"models": [tag(m, architecture(m.name), modified_at) for m in controller.view().models]}

    @api.get("/ps", responses={200: {"description": "`models`: the loaded ones, with the nodes they run on."}})
    async def ps():
        """The loaded models: their memory (size, size_vram), when they unload, and homefleet's
        `nodes` (where their replicas run)."""
        now = time.time()
        entries = (running(m, architecture(m.name), controller.unloads_in_s(m.name), now)
                   for m in controller.view().models)
        return {"models": [entry for entry in entries if entry is not None]}

    @api.post("/show", responses={200: {"description": "details, model_info, capabilities, parameters."},
                                  **_errors(400, 404)})
    async def show_model(body: ShowRequest):
        """What a model is: its family, quantization, context and capabilities."""
        name = body.model_name
        known(name)
        view = next(m for m in controller.view().models if m.name == name)
        return show(view, architecture(name), controller.models[name].embedding, modified_at)

    @api.get("/version", responses={200: {"description": "`version`: the Ollama API version followed."}})
    async def version():
        """The Ollama API version this surface follows."""
        return {"version": OLLAMA_API_VERSION}

    surface = APIRouter(tags=["Ollama"], route_class=OllamaRoute)

    @surface.head("/", response_class=Response, responses={200: {"description": "Empty: the server runs."}})
    async def heartbeat():
        """The Ollama CLI's probe (`GET /` is the dashboard)."""
        return Response(status_code=200)

    surface.include_router(api)
    return surface


async def _folded(response: EventStream, stream: OllamaStream, request: Request) -> JSONResponse:
    """The whole answer from the NDJSON stream; a client that leaves meanwhile ends it (its
    generation is cancelled on the replica)."""
    lines = response.body_iterator
    pieces: list[dict] = []

    async def read() -> None:
        async for line in lines:
            pieces.append(json.loads(line))

    reader = asyncio.ensure_future(read())
    try:
        while not reader.done():
            await asyncio.wait({reader}, timeout=DISCONNECT_POLL_S)
            if not reader.done() and await request.is_disconnected():
                return ollama_error(499, "the client closed the connection before the answer was ready")
        reader.result()
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait({reader})
        await lines.aclose()
        response.flight.end(served=False)  # a no-op when the stream ended it
    answer = fold(pieces)
    if "error" in answer:
        return ollama_error(stream.error_status or 502, answer["error"])
    return JSONResponse(answer, headers={h: response.headers[h] for h in NODE_HEADERS if h in response.headers})
