"""The gateway's end of the replicas' streams: one `pump` call per replica carries every
stream this gateway has there, a message a tick (worker/stream_outbox.py); each request
reads its own items, in order, from its PumpedStream.

A request's items: first {"error": ...} or b"" (accepted), then SSE bytes, then the end. An
exception (the replica's process died, or its stream failed) is raised to the reader.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Callable

from worker.stream_outbox import END

if TYPE_CHECKING:
    from orchestrator.controller import ReplicaRecord


class PumpedStream:
    """One request's items (an async iterator)."""

    def __init__(self) -> None:
        self._items: asyncio.Queue = asyncio.Queue()
        self.ended = False

    def __aiter__(self) -> PumpedStream:
        return self

    async def __anext__(self):
        item = await self._items.get()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item) -> None:
        if not self.ended:
            self.ended = item is END or isinstance(item, BaseException)
            self._items.put_nowait(item)


class _Pump:
    """One replica's pump: its reader task and the consumer id its streams were opened under."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.consumer = uuid.uuid4().hex
        self.task: asyncio.Task | None = None
        self.streams: set[str] = set()  # request ids open on it


class Pumps:
    """This gateway's pumps, one per replica with a stream open, started on demand. A pump
    that failed (its replica died, or Ray lost it) gives way to one under a new consumer id:
    an orphaned pump still running on the replica then has no stream of its own and ends."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[_Pump, PumpedStream]] = {}  # request id -> (its pump, stream)
        self._pumps: dict[int, _Pump] = {}  # id(replica handle) -> its pump (which holds the handle)
        self._watches: set[asyncio.Task] = set()  # the event loop keeps only weak references

    def open(self, replica: ReplicaRecord, request_id: str, serve: Callable[[str], Any]) -> PumpedStream:
        """Start the request (`serve(consumer)`: the replica's serve_* call) and return its stream."""
        pump = self._pumps.get(id(replica.handle))
        if pump is None or pump.handle is not replica.handle:
            pump = self._pumps[id(replica.handle)] = _Pump(replica.handle)
        stream = PumpedStream()
        self._streams[request_id] = (pump, stream)
        pump.streams.add(request_id)
        if pump.task is None or pump.task.done():
            pump.task = asyncio.ensure_future(self._read(pump))
        watch = asyncio.ensure_future(self._watch(request_id, serve(pump.consumer)))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return stream

    def close(self, request_id: str) -> None:
        """The reader is done with it (what still comes for it is dropped)."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[0].streams.discard(request_id)

    def open_streams(self) -> int:
        return len(self._streams)

    async def _watch(self, request_id: str, call) -> None:
        """The serve call's own failure (the replica never ran it) ends its stream."""
        try:
            await call
        except Exception as exc:
            self._deliver(request_id, exc)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            entry[1]._put(item)
            if entry[1].ended:
                self.close(request_id)

    async def _read(self, pump: _Pump) -> None:
        try:
            async for ref in pump.handle.pump.remote(pump.consumer):
                for request_id, items in (await ref).items():
                    for item in items:
                        self._deliver(request_id, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica is gone (or Ray lost the pump): so are its streams
            if self._pumps.get(id(pump.handle)) is pump:
                del self._pumps[id(pump.handle)]  # the next stream opens a pump under a new consumer id
            for request_id in list(pump.streams):
                self._deliver(request_id, exc)
            return
        if pump.streams:  # it ended idle just as a stream opened: that stream needs one
            pump.task = asyncio.ensure_future(self._read(pump))
        elif self._pumps.get(id(pump.handle)) is pump:
            del self._pumps[id(pump.handle)]
