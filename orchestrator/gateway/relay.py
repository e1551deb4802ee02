"""Carrying a replica's answer to the client, whole or as server-sent events.

Whatever happens (an answer, an engine error, a client that leaves, a replica that dies
under the request), the router's in-flight slot is released exactly once, and a client
that leaves cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from orchestrator.gateway.errors import error_body, error_response
from orchestrator.gateway.metrics import SSE_DONE, RequestOutcome, usage_of_final_item
from orchestrator.gateway.router import Router
from orchestrator.gateway.stream_pump import Pumps
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller, ReplicaRecord

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
LOADING_COMMENT_S = 2.0  # while a streamed request waits for its model to load: a comment line this often
# Longest wait for a replica's answer, or for the next item of a stream: the replica ends any
# generation at its limit (generation_limit_s, 600 s), so past this the replica is stuck.
ANSWER_TIMEOUT_S = 660.0
CLIENT_LEFT_STATUS = 499  # nginx's "client closed request": how a flight ends that nobody answered


Transform = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


class ReplicaLost(RequestError):
    """The replica's process died before it sent anything for this request: another replica
    may take it (no byte has reached the client)."""


def node_headers(replica: ReplicaRecord) -> dict[str, str]:
    return {"x-homefleet-node": replica.node_name, "x-homefleet-replica": replica.replica_id}


class Flight:
    """One request's hold on a replica, ended exactly once on whichever path comes first; a
    request that ends unserved is cancelled on the replica (its client left, or it failed)."""

    def __init__(self, router: Router, replica: ReplicaRecord, request_id: str) -> None:
        self.router = router
        self.replica = replica
        self.request_id = request_id
        self.epoch = replica.flight_epoch
        self.ended = False
        # For the metrics (gateway/metrics.py): when it began, its first token, its usage.
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self.usage: dict | None = None
        self.failure_status: int | None = None  # the replica failed under it (502, 504)

    def end(self, served: bool, cancel: bool = True, status: int | None = None) -> None:
        """`status`: of the replica's error, when it refused the request."""
        if self.ended:
            return
        self.ended = True
        if not served and cancel:
            self.replica.handle.cancel.remote(self.request_id)
        self.router.release(self.replica, served, self.epoch)
        status = 200 if served else status or self.failure_status or CLIENT_LEFT_STATUS
        self.router.finished(self.replica, RequestOutcome(
            self.replica.model, self.replica.node_name, status, self.started_at, time.monotonic(),
            self.first_token_at, self.usage if served else None))

    def failed(self, exc: BaseException) -> None:
        """The replica failed under it (a timeout is a 504, anything else a 502: Relay.failed)."""
        self.failure_status = 504 if isinstance(exc, asyncio.TimeoutError) else 502


class EventStream(StreamingResponse):
    """Server-sent events that always end their flight when the response is over, even when the
    client left before the first chunk or while one was being sent."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], flight: Flight, headers: dict[str, str],
                 media_type: str | None = None) -> None:
        super().__init__(content, headers=headers, media_type=media_type)
        self.flight = flight

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.flight.end(served=False)  # a no-op when the stream ended it


async def _awaited(ref):
    return await ref


class Relay:
    def __init__(self, controller: Controller, router: Router, disconnect_poll_s: float = DISCONNECT_POLL_S) -> None:
        self.controller = controller
        self.router = router
        self.disconnect_poll_s = disconnect_poll_s
        self.pumps = Pumps()

    async def failed(self, replica: ReplicaRecord, exc: Exception) -> RequestError:
        """The replica broke under a request: log the detail, tell the client briefly."""
        log.warning("request to %s on %s failed", replica.replica_id, replica.node_name, exc_info=exc)
        lost = self.controller.cluster.is_dead_actor_error(exc)
        if lost:
            self.controller.replica_lost(replica, f"replica process died: {type(exc).__name__}")
        if isinstance(exc, asyncio.TimeoutError):
            return RequestError(f"replica {replica.replica_id} on {replica.node_name} did not answer within "
                                f"{ANSWER_TIMEOUT_S:.0f} s", status=504, type="server_error", code="timeout")
        helpers = [h.node for h in replica.assignment.helpers] if replica.assignment else []
        where = replica.node_name + (f" (split with {', '.join(helpers)} over RPC)" if helpers else "")
        return (ReplicaLost if lost else RequestError)(
            f"replica {replica.replica_id} on {where} failed ({type(exc).__name__}); retry shortly",
            status=502,
            type="server_error",
        )

    async def whole(self, replica: ReplicaRecord, start: Callable[[str], Any], request: Request,
                    shape: Callable[[dict], dict] | None = None) -> JSONResponse:
        """A non-streamed answer (reshaped by `shape`, if given); a client that leaves meanwhile
        cancels it at its next token."""
        flight = Flight(self.router, replica, uuid.uuid4().hex)
        try:
            result = await self._wait(replica, _awaited(start(flight.request_id)), request, flight.request_id)
        except Exception as exc:
            flight.failed(exc)
            flight.end(served=False)
            raise await self.failed(replica, exc) from None
        except BaseException:  # cancelled (the server stops): free the model
            flight.end(served=False)
            raise
        if "error" in result:  # the replica answered with an error: it is done with the request
            error = RequestError.from_dict(result["error"])
            flight.end(served=False, cancel=False, status=error.status)
            return error_response(error)
        flight.usage = result.get("usage")
        flight.end(served=True)
        return JSONResponse(shape(result) if shape else result, headers=node_headers(replica))

    async def _wait(self, replica: ReplicaRecord, answer, request: Request, request_id: str):
        """`answer` (a coroutine), cancelling it on the replica when the client leaves; a
        TimeoutError past ANSWER_TIMEOUT_S."""
        pending = asyncio.ensure_future(answer)
        deadline = asyncio.get_running_loop().time() + ANSWER_TIMEOUT_S
        try:
            while not pending.done():
                if asyncio.get_running_loop().time() > deadline:
                    replica.handle.cancel.remote(request_id)
                    raise asyncio.TimeoutError
                await asyncio.wait({pending}, timeout=self.disconnect_poll_s)
                if not pending.done() and await request.is_disconnected():
                    replica.handle.cancel.remote(request_id)
                    await asyncio.wait({pending}, timeout=self.disconnect_poll_s)
                    break
            # The client left: the replica stops at its next token; a stuck one still times out.
            remaining = max(self.disconnect_poll_s, deadline - asyncio.get_running_loop().time())
            return await asyncio.wait_for(pending, remaining)
        finally:
            pending.cancel()  # a no-op once done

    async def stream(self, replica: ReplicaRecord, start: Callable[[str, str], Any],
                     request: Request | None = None, transform: Transform | None = None,
                     media_type: str | None = None) -> StreamingResponse | JSONResponse:
        """SSE bytes as the replica sends them. `start(request_id, consumer)` is the replica's
        serve_* call; the items come over its pump (gateway/stream_pump.py). The first says
        whether it accepted the request (b"") or not ({"error": ...}, answered with the
        error's status). A client that leaves while it waits for that frees its place at once.
        `transform` reframes the bytes (the Ollama API's NDJSON, as `media_type`); closing it
        must close what it reads."""
        flight = Flight(self.router, replica, uuid.uuid4().hex)
        try:
            generator = self.pumps.open(replica, flight.request_id, lambda consumer: start(flight.request_id, consumer))
            if request is not None:
                first = await self._wait(replica, anext(generator), request, flight.request_id)
            else:
                first = await asyncio.wait_for(anext(generator), ANSWER_TIMEOUT_S)
        except Exception as exc:
            self.pumps.close(flight.request_id)
            flight.failed(exc)
            flight.end(served=False)
            raise await self.failed(replica, exc) from None
        except BaseException:  # cancelled while waiting for the replica
            self.pumps.close(flight.request_id)
            flight.end(served=False)
            raise
        if isinstance(first, dict) and "error" in first:
            self.pumps.close(flight.request_id)
            error = RequestError.from_dict(first["error"])
            flight.end(served=False, cancel=False, status=error.status)
            return error_response(error)
        headers = {**node_headers(replica), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        body = self._forward(replica, generator, flight)
        return EventStream(transform(body) if transform else body, flight, headers, media_type)

    def stream_after_load(self, model: str, start: Callable[[ReplicaRecord, str, str], Any]) -> StreamingResponse:
        """A stream for a model that is not loaded: SSE comment lines (`: loading 40%`) while it
        loads, so that proxies keep the connection, then its answer (an error, as an error
        event). Leaving stops the wait."""
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._load_then_forward(model, start), media_type="text/event-stream",
                                 headers=headers)

    async def _load_then_forward(self, model: str, start) -> AsyncIterator[bytes]:
        waiter = asyncio.ensure_future(self.controller.wait_until_ready(model, self.router.load_timeout_s))
        flight: Flight | None = None
        try:
            while not waiter.done():
                yield _loading_comment(*self.controller.load_progress(model))
                await asyncio.wait({waiter}, timeout=LOADING_COMMENT_S)
            try:
                waiter.result()
                replica = self.router.acquire(model)
            except RequestError as exc:
                yield _error_event(exc)
                return
            flight = Flight(self.router, replica, uuid.uuid4().hex)
            request_id = flight.request_id
            try:
                generator = self.pumps.open(replica, request_id, lambda consumer: start(replica, request_id, consumer))
                first = await anext(generator)
            except Exception as exc:
                flight.failed(exc)
                flight.end(served=False)
                yield _error_event(await self.failed(replica, exc))
                return
            if isinstance(first, dict) and "error" in first:
                error = RequestError.from_dict(first["error"])
                flight.end(served=False, cancel=False, status=error.status)
                yield _error_event(error)
                return
            async for chunk in self._forward(replica, generator, flight):
                yield chunk
        finally:
            waiter.cancel()
            if flight is not None:
                self.pumps.close(flight.request_id)
                flight.end(served=False)  # a no-op when the stream ended it

    async def _forward(self, replica: ReplicaRecord, generator, flight: Flight) -> AsyncIterator[bytes]:
        served = False
        try:
            while True:  # each item within ANSWER_TIMEOUT_S: a stuck replica ends the stream, never hangs it
                try:
                    item = await asyncio.wait_for(anext(generator), ANSWER_TIMEOUT_S)
                except StopAsyncIteration:
                    break
                if flight.first_token_at is None:  # the replica sends its first token at once
                    flight.first_token_at = time.monotonic()
                if isinstance(item, bytes) and item.endswith(SSE_DONE):  # the last item: its usage
                    flight.usage = usage_of_final_item(item)
                    served = True  # a stream the replica ended without [DONE] (cancelled) was not served
                yield item
        except Exception as exc:
            # Mid-stream the status is sent already: an error event, then the stream ends.
            flight.failed(exc)
            yield _error_event(await self.failed(replica, exc))
        finally:
            self.pumps.close(flight.request_id)
            flight.end(served)


def _error_event(exc: RequestError) -> bytes:
    return b"data: " + json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)).encode() + b"\n\n"


def _loading_comment(state: str, percent: int | None, detail: str | None) -> bytes:
    """`: loading 40%` (an SSE comment: clients ignore it, proxies see traffic)."""
    words = "loading" if state in ("loading", "pending", "not_loaded") else state
    text = f": {words}" + (f" {percent}%" if percent is not None else "") + (f" ({detail})" if detail else "")
    return text.replace("\n", " ").encode() + b"\n\n"
