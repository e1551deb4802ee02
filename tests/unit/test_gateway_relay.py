"""Answers carried back through the real app from fake replicas: streams, errors mid-way, and
the in-flight slot released exactly once on every path (served, refused by the engine, the
client leaving, the replica dying)."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_gateway_fakes import (
    MODEL,
    FakeController,
    FakeReplicaHandle,
    ReplicaDied,
    Script,
    app_for,
    asgi_client,
    chat_events,
    raw_asgi,
    text_answer,
)

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "Hi"}]
CHAT = {"model": MODEL, "messages": USER}
ENGINE_ERROR = {"message": "This model's maximum context length is 1024 tokens.", "status": 400,
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}


@pytest.fixture
def handle() -> FakeReplicaHandle:
    return FakeReplicaHandle()


@pytest.fixture
def controller(handle) -> FakeController:
    controller = FakeController(MODEL, gateway={"queue_per_replica": 1})
    controller.add_replica(MODEL, handle)
    return controller


@pytest.fixture
def app(controller):
    return app_for(controller)


def replica(controller: FakeController):
    return controller.replicas[(MODEL, 0)]


def events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def post(app, body: dict, path: str = "/v1/chat/completions"):
    async with asgi_client(app) as client:
        return await client.post(path, json=body)


# ----------------------------------------------------------------------------- served


@pytest.mark.parametrize("stream", [False, True])
async def test_a_served_request_releases_its_slot_and_counts_as_served(app, controller, stream):
    response = await post(app, {**CHAT, "stream": stream})
    assert response.status_code == 200
    assert response.headers["x-homefleet-node"] == "desktop" and response.headers["x-homefleet-replica"] == f"{MODEL}#0"
    record = replica(controller)
    assert (record.in_flight, record.served, controller.nodes["node-1"].requests_served) == (0, 1, 1)


async def test_a_stream_is_forwarded_as_the_replica_sent_it(app, handle):
    handle.will(Script(events=chat_events("Hel", "lo")))
    response = await post(app, {**CHAT, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    sent = events(response.text)
    assert sent[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in sent[:-1]) == "Hello"


async def test_a_text_completion_stream_goes_to_serve_text(app, handle):
    handle.will(Script(answer=text_answer()))
    assert (await post(app, {"model": MODEL, "prompt": "a"}, "/v1/completions")).json()["object"] == "text_completion"
    await post(app, {"model": MODEL, "prompt": "a", "stream": True}, "/v1/completions")
    assert [name for name, _ in handle.calls] == ["complete", "serve_text"]


# ----------------------------------------------------------------------------- refused by the engine


@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_error_keeps_its_status_and_releases_the_slot_unserved(app, controller, handle, stream):
    handle.will(Script(answer={"error": ENGINE_ERROR}, error=ENGINE_ERROR))
    response = await post(app, {**CHAT, "stream": stream})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert (replica(controller).in_flight, replica(controller).served) == (0, 0)
    assert handle.cancelled == []  # the replica is done with it already


# ----------------------------------------------------------------------------- the replica fails


async def test_a_stream_that_fails_mid_way_sends_an_error_event_then_ends(app, controller, handle):
    handle.will(Script(events=chat_events("Hel", "lo"), raise_at=2, exception=RuntimeError("engine crashed")))
    response = await post(app, {**CHAT, "stream": True})
    assert response.status_code == 200  # sent before the failure
    sent = events(response.text)
    assert json.loads(sent[0])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(sent[-1])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "[DONE]" not in sent
    assert (replica(controller).in_flight, replica(controller).served) == (0, 0)
    assert len(handle.cancelled) == 1
    assert controller.died == []  # an error, not a dead process


async def test_a_replica_that_dies_mid_stream_is_reported_to_the_controller(app, controller, handle):
    record = replica(controller)
    handle.will(Script(raise_at=3, exception=ReplicaDied("actor died")))
    response = await post(app, {**CHAT, "stream": True})
    assert json.loads(events(response.text)[-1])["error"]["type"] == "server_error"
    assert controller.died == [(f"{MODEL}#0", "replica process died: ReplicaDied")]
    assert record.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_replica_that_dies_before_answering_is_a_502_and_frees_the_slot(app, controller, handle, stream):
    record = replica(controller)
    handle.will(Script(raise_at=0, exception=ReplicaDied("actor died")))
    response = await post(app, {**CHAT, "stream": stream})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "server_error" and "retry" in response.json()["error"]["message"]
    assert controller.died and record.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_whose_replica_dies_before_answering_goes_to_another_replica(controller, handle, stream):
    other = FakeReplicaHandle()
    controller.add_replica(MODEL, other)
    app = app_for(controller)
    handle.will(Script(raise_at=0, exception=ReplicaDied("actor died")))
    response = await post(app, {**CHAT, "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["x-homefleet-replica"] == f"{MODEL}#1"
    assert [name for name, _ in other.calls] == ["serve_chat" if stream else "chat"]
    assert controller.died == [(f"{MODEL}#0", "replica process died: ReplicaDied")]
    assert all(r.in_flight == 0 for r in controller.replicas.values())


# ----------------------------------------------------------------------------- the client leaves


async def test_a_client_that_leaves_mid_stream_cancels_the_generation_and_frees_the_slot(app, controller, handle):
    handle.will(Script(events=chat_events(*"abcdefgh"), hold=True))
    sent = await raw_asgi(app, "POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}).encode(),
                          leave_after_chunks=1)
    assert sent[0]["status"] == 200
    assert len(handle.cancelled) == 1
    assert (replica(controller).in_flight, replica(controller).served) == (0, 0)


async def test_a_client_gone_before_the_stream_starts_still_frees_the_slot(app, controller, handle):
    handle.will(Script(events=chat_events("a", "b")))
    with pytest.raises(OSError):
        await raw_asgi(app, "POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}).encode(),
                       send_fails=True)
    assert len(handle.cancelled) == 1
    assert (replica(controller).in_flight, replica(controller).served) == (0, 0)


async def test_a_client_that_leaves_a_whole_answer_cancels_it_and_frees_the_slot(app, controller, handle):
    handle.will(Script(hold=True))  # noticed at the next disconnect poll (0.5 s)
    sent = await raw_asgi(app, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(), leave_after_s=0.1)
    assert len(handle.cancelled) == 1
    assert sent[0]["status"] == 499
    assert (replica(controller).in_flight, replica(controller).served) == (0, 0)


async def test_a_full_queue_is_a_503_overloaded_and_frees_nothing_it_did_not_take(app, controller):
    replica(controller).in_flight = 2  # one running + a queue of one
    response = await post(app, CHAT)
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
    assert response.headers["retry-after"]
    assert replica(controller).in_flight == 2
