"""orchestrator/gateway/stream_pump.py: one pump per replica carries every stream; each
request reads its own items in order; a replica that dies ends all of its streams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from orchestrator.gateway.stream_pump import Pumps

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Died(Exception):
    pass


async def _value(value):
    return value


async def _raise(exc):
    raise exc


class ScriptedReplica:
    """A replica's `serve_chat` and `pump` over Ray, scripted: the test feeds the pump's
    messages ({request id: [items]}) or kills it."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.pump_consumers: list[str] = []
        self.serve_calls: list[tuple[str, str]] = []
        self.serve_error: Exception | None = None
        self.handle = self

    @property
    def pump(self):
        return _Remote(self._pump)

    @property
    def serve_chat(self):
        return _Remote(self._serve)

    def _serve(self, request_id: str, consumer: str):
        self.serve_calls.append((request_id, consumer))
        return _raise(self.serve_error) if self.serve_error else _value(None)

    def _pump(self, consumer: str):
        self.pump_consumers.append(consumer)
        return self._messages()

    async def _messages(self):
        while True:
            message = await self.messages.get()
            if message == "idle":
                return
            if isinstance(message, Exception):
                yield _raise(message)
                return
            yield _value(message)


@dataclass
class _Remote:
    fn: object

    def remote(self, *args):
        return self.fn(*args)


@dataclass
class Record:
    replica_id: str
    handle: ScriptedReplica


def record(replica_id: str) -> Record:
    return Record(replica_id, ScriptedReplica())


def opened(pumps: Pumps, replica: Record, request_id: str):
    return pumps.open(replica, request_id, lambda consumer: replica.handle.serve_chat.remote(request_id, consumer))


async def items_of(stream) -> list:
    async def read():
        return [item async for item in stream]

    return await asyncio.wait_for(read(), 2)


async def next_of(stream):
    return await asyncio.wait_for(stream.__anext__(), 2)


async def test_two_streams_on_one_replica_share_one_pump_and_each_gets_its_items_in_order():
    pumps, replica = Pumps(), record("m#0")
    a, b = opened(pumps, replica, "a"), opened(pumps, replica, "b")
    await replica.handle.messages.put({"a": [b"", b"data: 1\n\n"], "b": [b""]})
    await replica.handle.messages.put({"b": [b"data: x\n\n", None], "a": [b"data: 2\n\n", None]})
    assert await items_of(a) == [b"", b"data: 1\n\n", b"data: 2\n\n"]
    assert await items_of(b) == [b"", b"data: x\n\n"]
    consumer = replica.handle.pump_consumers[0]
    assert replica.handle.pump_consumers == [consumer]  # one pump for both
    assert replica.handle.serve_calls == [("a", consumer), ("b", consumer)]
    assert pumps.open_streams() == 0


async def test_a_replica_that_dies_ends_each_of_its_streams_with_the_error_and_no_other():
    pumps, dying, other = Pumps(), record("m#0"), record("m#0")  # a replacement under the same id
    a, b, c = opened(pumps, dying, "a"), opened(pumps, dying, "b"), opened(pumps, other, "c")
    await dying.handle.messages.put({"a": [b""]})
    await dying.handle.messages.put(Died("actor died"))
    assert await next_of(a) == b""
    for stream in (a, b):
        with pytest.raises(Died):
            await next_of(stream)
    await other.handle.messages.put({"c": [b"", None]})
    assert await items_of(c) == [b""]


async def test_a_pump_that_ended_idle_as_a_stream_opened_is_opened_again():
    pumps, replica = Pumps(), record("m#0")
    await replica.handle.messages.put("idle")  # the replica's pump ends (nothing open there yet)
    stream = opened(pumps, replica, "a")
    await asyncio.sleep(0.05)
    await replica.handle.messages.put({"a": [b"", None]})
    assert await items_of(stream) == [b""]
    first, again = replica.handle.pump_consumers
    assert again == first  # the stream was opened under it


async def test_a_serve_call_that_fails_ends_its_stream_with_the_error():
    pumps, replica = Pumps(), record("m#0")
    replica.handle.serve_error = Died("no such actor")
    stream = opened(pumps, replica, "a")
    with pytest.raises(Died):
        await next_of(stream)


async def test_items_for_a_closed_stream_are_dropped():
    pumps, replica = Pumps(), record("m#0")
    stream = opened(pumps, replica, "a")
    pumps.close("a")
    await replica.handle.messages.put({"a": [b"", None]})
    await asyncio.sleep(0.05)
    assert stream._items.empty() and pumps.open_streams() == 0


async def test_after_a_pump_fails_the_next_stream_opens_one_under_a_new_consumer_id():
    """Ray may lose a pump whose replica lives on (a network blip): that pump may still run
    there, and must not take the new streams' items."""
    pumps, replica = Pumps(), record("m#0")
    lost = opened(pumps, replica, "a")
    await replica.handle.messages.put(Died("actor unavailable"))
    with pytest.raises(Died):
        await next_of(lost)
    stream = opened(pumps, replica, "b")
    await replica.handle.messages.put({"b": [b"", None]})
    assert await items_of(stream) == [b""]
    first, second = replica.handle.pump_consumers
    assert first != second and replica.handle.serve_calls[-1] == ("b", second)
