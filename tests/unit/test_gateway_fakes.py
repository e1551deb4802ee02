"""A fake cluster for gateway tests: the controller's interface to the gateway, and replica
handles that answer like Ray's (`.chat.remote()` an awaitable; `.serve_chat.remote()` puts a
stream's items in an outbox that `.pump.remote()`, an async generator of awaitables, carries),
each scripted by the test. The tests at the end keep the fake
honest: it offers what the real controller offers, under the same names.

Also the clients: `asgi_client(app, peer)` (httpx through the real ASGI app, from any peer
address) and `raw_asgi(...)` for a client that leaves mid-answer.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest

from orchestrator.cluster_view import ClusterView, ModelView, ReplicaView
from orchestrator.config import HomefleetConfig, ModelConfig
from orchestrator.controller import Controller, NodeRecord, ReplicaRecord
from orchestrator.gateway.app import create_app

LOOPBACK = ("127.0.0.1", 50000)
LAN_PEER = ("192.168.1.20", 50000)
MODEL = "gemma-3-270m"


class ReplicaDied(Exception):
    """Stands for Ray's RayActorError: the replica's process is gone."""


# ----------------------------------------------------------------------------- answers


def chat_answer(text: str = "Hello!", model: str = MODEL) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def text_answer(text: str = " Paris", model: str = MODEL) -> dict:
    return {
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def sse(payload: dict | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def chat_events(*pieces: str) -> list[bytes]:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    role = {"role": "assistant", "content": ""}
    out = [sse({**chunk, "choices": [{"index": 0, "delta": role, "finish_reason": None}]})]
    out += [sse({**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces]
    out.append(sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n")
    return out


# ----------------------------------------------------------------------------- replicas


@dataclass
class Script:
    """What a replica does with the next request.

    answer: the whole answer (or {"error": {...}}); events: SSE bytes of a stream (its first
    item b"" is added, as the replica does); error: the stream's first item instead;
    raise_at: raise `exception` on awaiting event number N (0: before accepting); hold: the
    answer waits until the request is cancelled (a long generation)."""

    answer: dict = field(default_factory=chat_answer)
    events: list[bytes] = field(default_factory=lambda: chat_events("Hel", "lo"))
    error: dict | None = None
    raise_at: int | None = None
    exception: Exception = field(default_factory=lambda: ReplicaDied("actor died"))
    hold: bool = False


class _Ref:
    """An awaitable like Ray's ObjectRef (nothing runs unless it is awaited)."""

    def __init__(self, fn, *args) -> None:
        self._fn, self._args = fn, args

    def __await__(self):
        return self._fn(*self._args).__await__()


async def _value(value):
    return value


async def _raise(exc: Exception):
    raise exc


class _Method:
    def __init__(self, fn) -> None:
        self.remote = fn


class _Pump:
    """Like Ray's ObjectRefGenerator of the replica's `pump`: refs to {request id: [items]}.
    It ends once the consumer has no stream open and nothing waiting (the gateway opens
    another); an item that is ReplicaDied kills it, as the actor's death does."""

    def __init__(self, handle: FakeReplicaHandle, consumer: str) -> None:
        self.handle, self.consumer = handle, consumer

    def __aiter__(self):
        return self

    async def __anext__(self) -> _Ref:
        queue = self.handle._outbox(self.consumer)
        if queue.empty() and not self.handle._open.get(self.consumer):
            raise StopAsyncIteration
        request_id, item = await queue.get()
        if isinstance(item, ReplicaDied):
            return _Ref(_raise, item)
        return _Ref(_value, {request_id: [item]})


class FakeReplicaHandle:
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.calls: list[tuple[str, tuple]] = []
        self.cancelled: list[str] = []
        self._cancel_events: dict[str, asyncio.Event] = {}
        for name in ("chat", "complete", "embed"):
            setattr(self, name, _Method(self._whole_method(name)))
        for name in ("serve_chat", "serve_text"):
            setattr(self, name, _Method(self._serve_method(name)))
        self.pump = _Method(lambda consumer: _Pump(self, consumer))
        self.cancel = _Method(self._cancel)
        self._outboxes: dict[str, asyncio.Queue] = {}  # consumer -> (request id, item)
        self._open: dict[str, set[str]] = {}  # consumer -> its streams not ended

    def will(self, script: Script) -> FakeReplicaHandle:
        self.scripts.append(script)
        return self

    def _next(self) -> Script:
        return self.scripts.pop(0) if self.scripts else Script()

    def _whole_method(self, name: str):
        def remote(*args):
            self.calls.append((name, args))
            script, request_id = self._next(), args[-1]
            if script.raise_at is not None:
                return _Ref(_raise, script.exception)
            return _Ref(self._answer, script, request_id)

        return remote

    async def _answer(self, script: Script, request_id: str) -> dict:
        if script.hold:
            await self.wait_cancelled(request_id)
            return {"error": {"message": "the client closed the connection", "status": 499,
                              "type": "invalid_request_error", "code": "client_closed_request"}}
        return script.answer

    def _serve_method(self, name: str):
        def remote(*args):
            self.calls.append((name, args))
            script, request_id, consumer = self._next(), args[-2], args[-1]
            self._open.setdefault(consumer, set()).add(request_id)
            return _Ref(self._serve, script, request_id, consumer)

        return remote

    def _outbox(self, consumer: str) -> asyncio.Queue:
        return self._outboxes.setdefault(consumer, asyncio.Queue())

    async def _serve(self, script: Script, request_id: str, consumer: str) -> None:
        """The stream's items into the consumer's outbox, as the replica's serve_* does: b""
        (or the error), the events, then its end (None); `raise_at`: the exception instead."""
        items = [b""] if script.error is None else [{"error": script.error}]
        items += list(script.events) if script.error is None else []
        outbox = self._outbox(consumer)
        try:
            for index, item in enumerate(items):
                await asyncio.sleep(0)
                if script.hold and index == 2:
                    await self.wait_cancelled(request_id)
                if request_id in self.cancelled:
                    break
                if script.raise_at == index:
                    outbox.put_nowait((request_id, script.exception))
                    return
                outbox.put_nowait((request_id, item))
        finally:
            outbox.put_nowait((request_id, None))
            self._open[consumer].discard(request_id)

    def _cancel(self, request_id: str) -> _Ref:
        self.cancelled.append(request_id)
        self._event(request_id).set()
        return _Ref(_value, None)

    def _event(self, request_id: str) -> asyncio.Event:
        return self._cancel_events.setdefault(request_id, asyncio.Event())

    async def wait_cancelled(self, request_id: str) -> None:
        await self._event(request_id).wait()


# ----------------------------------------------------------------------------- controller


class FakeCluster:
    @staticmethod
    def is_dead_actor_error(exc: BaseException) -> bool:
        return isinstance(exc, ReplicaDied)


class FakeFiles:
    def __init__(self) -> None:
        self.pulled: list[tuple] = []

    async def pull(self, source: str, node: str | None, sha256: str | None) -> dict:
        self.pulled.append((source, node, sha256))
        return {"transfer_id": "t1", "node": node or "desktop", "name": source}

    async def transfer(self, transfer_id: str) -> dict | None:
        return None

    async def prune(self, dry_run: bool) -> list[dict]:
        return []


class FakeController:
    """The controller as the gateway sees it, with replicas the test adds."""

    def __init__(self, *models: str, **config) -> None:
        names = models or (MODEL,)
        self.config = HomefleetConfig(models=[ModelConfig(name=n, path=f"/m/{n}.gguf", context=2048) for n in names],
                                      **config)
        self.nodes = {"node-1": NodeRecord(node_id="node-1", address="192.168.1.10", is_head=True, name="desktop")}
        self.replicas: dict[tuple[str, int], ReplicaRecord] = {}
        self.states: dict[str, tuple[str, str | None]] = {}
        self.cluster = FakeCluster()
        self.files = FakeFiles()
        self.died: list[tuple[str, str]] = []
        self.waiting: dict[str, int] = {}
        self.touched: list[tuple[str, object]] = []

    @property
    def models(self) -> dict[str, ModelConfig]:
        return {m.name: m for m in self.config.models}

    def touch(self, name: str, keep_alive: object = None) -> None:
        self.touched.append((name, keep_alive))

    def waits_for_load(self, name: str) -> bool:
        return False  # the loading path runs against the real controller (tests/integration/test_on_demand.py)

    def unloads_in_s(self, name: str) -> float | None:
        return None

    def add_replica(self, model: str = MODEL, handle: FakeReplicaHandle | None = None) -> ReplicaRecord:
        index = sum(1 for (m, _) in self.replicas if m == model)
        record = ReplicaRecord(model=model, index=index, node_id="node-1", node_name="desktop", assignment=None,
                               handle=handle or FakeReplicaHandle(), state="ready")
        self.replicas[(model, index)] = record
        return record

    def ready_replicas(self, model: str) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.model == model and r.state == "ready"]

    def model_state(self, name: str) -> tuple[str, str | None]:
        if self.ready_replicas(name):
            return "ready", None
        return self.states.get(name, ("loading", None))

    def retry_after_s(self, name: str) -> int | None:
        return None

    def replica_lost(self, replica: ReplicaRecord, reason: str) -> None:
        self.died.append((replica.replica_id, reason))
        self.replicas.pop((replica.model, replica.index), None)

    def view(self) -> ClusterView:
        models = []
        for model in self.config.models:
            state, reason = self.model_state(model.name)
            replicas = [ReplicaView(replica_id=r.replica_id, node=r.node_name, state=r.state, in_flight=r.in_flight,
                                    requests_served=r.served) for r in self.replicas.values() if r.model == model.name]
            models.append(ModelView(name=model.name, context=model.context, state=state, reason=reason,
                                    replicas=replicas))
        return ClusterView(models=models, generated_at=time.time())


# ----------------------------------------------------------------------------- clients


def app_for(controller: FakeController, api_key: str | None = None):
    return create_app(controller, controller.config, api_key=api_key)


def asgi_client(app, peer: tuple[str, int] = LOOPBACK) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=peer), base_url="http://localhost:8000")


async def raw_asgi(app, method: str, path: str, body: bytes = b"", *, leave_after_chunks: int | None = None,
                   leave_after_s: float | None = None, send_fails: bool = False) -> list[dict]:
    """One request straight into the ASGI app; the client leaves after N body chunks of the
    answer, or after some seconds, or is gone before the answer starts (`send_fails`: sending
    raises OSError, as a server may). Returns the messages the app sent."""
    sent: list[dict] = []
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if send_fails:
            gone.set()
            raise OSError("the client is gone")
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if leave_after_chunks is not None and len(chunks) >= leave_after_chunks:
            gone.set()

    if leave_after_s is not None:
        asyncio.get_running_loop().call_later(leave_after_s, gone.set)
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": LOOPBACK, "server": ("gateway", 80),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


# ----------------------------------------------------------------------------- the fake's own tests

GATEWAY_USES = ("models", "ready_replicas", "model_state", "retry_after_s", "nodes", "view", "replica_lost",
                "cluster", "files", "config")


def test_fake_controller_offers_what_the_real_one_offers_under_the_same_names():
    real = {name for name, _ in inspect.getmembers(Controller)} | set(
        inspect.signature(Controller.__init__).parameters) | {"nodes", "files", "config", "cluster"}
    for name in GATEWAY_USES:
        assert name in real, name
        assert hasattr(FakeController(), name), name
    for name in ("ready_replicas", "model_state", "retry_after_s", "replica_lost"):
        fake, actual = inspect.signature(getattr(FakeController, name)), inspect.signature(getattr(Controller, name))
        assert list(fake.parameters) == list(actual.parameters), name


def test_fake_replica_handle_offers_the_replica_actor_methods():
    from worker.replica import ModelReplicaImpl

    for name in ("chat", "complete", "embed", "serve_chat", "serve_text", "pump", "cancel"):
        assert hasattr(ModelReplicaImpl, name)
        assert callable(getattr(FakeReplicaHandle(), name).remote)


@pytest.mark.anyio
async def test_fake_serve_sends_acceptance_then_events_then_the_end_over_the_pump():
    handle = FakeReplicaHandle()
    await handle.serve_chat.remote([], {}, "r1", "gateway")
    batches = [await ref async for ref in handle.pump.remote("gateway")]
    items = [item for batch in batches for item in batch["r1"]]
    assert items[0] == b"" and items[-2].endswith(b"data: [DONE]\n\n") and items[-1] is None
