"""The OpenAI-compatible endpoint, the cluster API, the dashboard and the probes.

Built by `create_app(controller, config)`; the controller owns the replica table and the
router reads it. Every error is OpenAI-shaped (gateway/errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import secrets
import struct
import time
import uuid
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from orchestrator.config import HomefleetConfig
from orchestrator.controller import Controller, ReplicaRecord
from orchestrator.core.routing import choose_replica
from orchestrator.gateway.errors import error_body, error_response, install_error_handlers
from orchestrator.gateway.files_api import install_files_api
from orchestrator.gateway.metrics import render_metrics
from orchestrator.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from worker.errors import RequestError

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
PUBLIC_PATHS = {"/", "/healthz", "/readyz", "/favicon.ico"}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Router:
    """Picks a replica for a model and keeps the in-flight counts honest."""

    def __init__(self, controller: Controller, queue_per_replica: int) -> None:
        self.controller = controller
        self.queue_per_replica = queue_per_replica

    def acquire(self, model: str) -> ReplicaRecord:
        known = self.controller.models
        if model not in known:
            served = ", ".join(sorted(known)) or "none"
            raise RequestError(
                f"The model '{model}' does not exist. Models served here: {served}.",
                status=404,
                param="model",
                code="model_not_found",
            )
        ready = self.controller.ready_replicas(model)
        if not ready:
            state, reason = self.controller.model_state(model)
            detail = f": {reason}" if reason else ""
            raise RequestError(f"The model '{model}' is {state}{detail}; retry shortly" if state in (
                "copying", "downloading", "loading") else f"The model '{model}' is {state}{detail}", status=503,
                type="server_error", code=f"model_{state}", retry_after_s=self.controller.retry_after_s(model))
        replica = choose_replica(ready, lambda r: r.in_flight, self.queue_per_replica)
        if replica is None:
            raise RequestError(
                f"All {len(ready)} replica(s) of '{model}' are busy with full queues; retry shortly.",
                status=503,
                type="server_error",
                code="overloaded",
            )
        replica.in_flight += 1
        return replica

    def release(self, replica: ReplicaRecord, served: bool) -> None:
        replica.in_flight -= 1
        if served:
            replica.served += 1
            node = self.controller.nodes.get(replica.node_id)
            if node is not None:
                node.requests_served += 1


async def _awaited(ref):
    return await ref


class ApiKeyOffLoopback:
    """Asks for the API key on every address but loopback. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would hide the client's disconnect from the endpoints behind it."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or _is_loopback((scope.get("client") or (None,))[0]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, sent = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        sent = sent.strip() if scheme.lower() == "bearer" else ""
        if not self.api_key:
            message = "This gateway serves loopback only: set HOMEFLEET_API_KEY (or gateway.api_key) to admit other addresses."
        elif not secrets.compare_digest(sent.encode(), self.api_key.encode()):
            message = "Incorrect API key provided: send 'Authorization: Bearer <HOMEFLEET_API_KEY>'."
        else:
            return await self.app(scope, receive, send)
        response = JSONResponse(status_code=401, content=error_body(message, "invalid_request_error", None, "invalid_api_key"))
        await response(scope, receive, send)


def _node_headers(replica: ReplicaRecord) -> dict[str, str]:
    return {"x-homefleet-node": replica.node_name, "x-homefleet-replica": replica.replica_id}


def create_app(controller: Controller, config: HomefleetConfig, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="homefleet", version="0.1.0", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    router = Router(controller, config.gateway.queue_per_replica)
    api_key = api_key or config.gateway.api_key
    dashboard_html = resources.files("orchestrator.gateway").joinpath("dashboard.html")

    app.add_middleware(ApiKeyOffLoopback, api_key=api_key)

    async def _replica_failed(replica: ReplicaRecord, exc: Exception) -> RequestError:
        """The replica broke under a request: log the detail, tell the client briefly."""
        log.warning("request to %s on %s failed", replica.replica_id, replica.node_name, exc_info=exc)
        if controller.cluster.is_dead_actor_error(exc):
            await controller.replica_died(replica, f"replica process died: {type(exc).__name__}")
        return RequestError(
            f"replica {replica.replica_id} on {replica.node_name} failed ({type(exc).__name__}); retry shortly",
            status=502,
            type="server_error",
        )

    async def _whole(replica: ReplicaRecord, start, request: Request) -> JSONResponse:
        """A non-streamed answer; a client that leaves meanwhile cancels it at its next token."""
        served = False
        request_id = uuid.uuid4().hex
        try:
            pending = asyncio.ensure_future(_awaited(start(request_id)))
            while not pending.done():
                await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
                if not pending.done() and await request.is_disconnected():
                    replica.handle.cancel.remote(request_id)
                    await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
                    break
            result = await pending
            if "error" in result:
                return error_response(RequestError.from_dict(result["error"]))
            served = True
            return JSONResponse(result, headers=_node_headers(replica))
        except Exception as exc:
            raise await _replica_failed(replica, exc) from None
        finally:
            router.release(replica, served)

    async def _stream(replica: ReplicaRecord, start, request_id: str) -> StreamingResponse | JSONResponse:
        try:
            generator = start()
            first = await (await generator.__anext__())
        except Exception as exc:
            router.release(replica, False)
            raise await _replica_failed(replica, exc) from None
        if isinstance(first, dict) and "error" in first:
            router.release(replica, False)
            return error_response(RequestError.from_dict(first["error"]))

        async def forward() -> AsyncIterator[bytes]:
            served = False
            try:
                async for ref in generator:
                    yield await ref
                served = True
            except Exception as exc:
                failure = await _replica_failed(replica, exc)
                yield b"data: " + json.dumps(error_body(failure.message, failure.type)).encode() + b"\n\n"
            finally:
                if not served:  # the client left (or the replica failed): free the model now
                    replica.handle.cancel.remote(request_id)
                router.release(replica, served)

        headers = {**_node_headers(replica), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(forward(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        replica = router.acquire(body.model)
        messages, sampling = body.engine_messages(), body.sampling()
        if body.stream:
            request_id = uuid.uuid4().hex
            return await _stream(
                replica, lambda: replica.handle.stream_chat.remote(messages, sampling, request_id), request_id
            )
        return await _whole(replica, lambda rid: replica.handle.chat.remote(messages, sampling, rid), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        replica = router.acquire(body.model)
        sampling = body.sampling()
        if body.stream:
            request_id = uuid.uuid4().hex
            return await _stream(
                replica, lambda: replica.handle.stream_text.remote(body.prompt, sampling, request_id), request_id
            )
        return await _whole(replica, lambda rid: replica.handle.complete.remote(body.prompt, sampling, rid), request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        replica = router.acquire(body.model)
        response = await _whole(replica, lambda rid: replica.handle.embed.remote(body.inputs(), rid), request)
        if body.encoding_format == "base64" and response.status_code == 200:
            result = json.loads(response.body)
            for item in result["data"]:
                item["embedding"] = base64.b64encode(struct.pack(f"<{len(item['embedding'])}f", *item["embedding"])).decode()
            return JSONResponse(result, headers=_node_headers(replica))
        return response

    @app.get("/v1/models")
    async def list_models():
        data = []
        for model in controller.config.models:
            state, reason = controller.model_state(model.name)
            nodes = sorted({r.node_name for r in controller.ready_replicas(model.name)})
            data.append(
                {
                    "id": model.name,
                    "object": "model",
                    "created": int(app.state.started_at),
                    "owned_by": "homefleet",
                    "state": state,
                    "nodes": nodes,
                    "context_length": model.context,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/api/cluster")
    async def cluster():
        return controller.view().model_dump(mode="json")

    install_files_api(app, controller)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        states = {m.name: controller.model_state(m.name)[0] for m in controller.config.models}
        ready = bool(states) and all(s in ("ready", "failed") for s in states.values()) and any(
            s == "ready" for s in states.values()
        )
        return JSONResponse({"ready": ready, "models": states}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(controller.view()), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(dashboard_html.read_text())

    app.state.started_at = time.time()
    return app
