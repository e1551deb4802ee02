"""The gateway's end of the replicas' streams: one `pump` call per replica carries every
stream this gateway has there, a message a tick (worker/stream_outbox.py); each request
reads its own items, in order, from its PumpedStream.

A request's items: first {"error": ...} or b"" (accepted), then SSE bytes, then the end. An
exception (the replica's process died, or its stream failed) is raised to the reader.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from orchestrator.controller import ReplicaRecord

log = logging.getLogger(__name__)

END = None  # worker/stream_outbox.py's END


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


class Pumps:
    """This gateway's pumps, one per replica with a stream open, started on demand."""

    def __init__(self, consumer: str | None = None) -> None:
        self.consumer = consumer or uuid.uuid4().hex  # who this gateway is to the replicas' outboxes
        self._streams: dict[str, tuple[str, PumpedStream]] = {}  # request id -> (replica id, stream)
        self._pumps: dict[str, asyncio.Task] = {}  # replica id -> its pump's reader
        self._watches: set[asyncio.Task] = set()  # the event loop keeps only weak references

    def open(self, replica: ReplicaRecord, request_id: str, serve: Callable[[str], Any]) -> PumpedStream:
        """Start the request (`serve(consumer)`: the replica's serve_* call) and return its stream."""
        stream = PumpedStream()
        self._streams[request_id] = (replica.replica_id, stream)
        self._ensure_pump(replica)
        watch = asyncio.ensure_future(self._watch(request_id, serve(self.consumer)))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return stream

    def close(self, request_id: str) -> None:
        """The reader is done with it (what still comes for it is dropped)."""
        self._streams.pop(request_id, None)

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
                self._streams.pop(request_id, None)

    def _ensure_pump(self, replica: ReplicaRecord) -> None:
        task = self._pumps.get(replica.replica_id)
        if task is None or task.done():
            self._pumps[replica.replica_id] = asyncio.ensure_future(self._pump(replica))

    async def _pump(self, replica: ReplicaRecord) -> None:
        try:
            async for ref in replica.handle.pump.remote(self.consumer):
                for request_id, items in (await ref).items():
                    for item in items:
                        self._deliver(request_id, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica is gone: so are its streams
            for request_id in self._on(replica):
                self._deliver(request_id, exc)
        finally:
            if self._pumps.get(replica.replica_id) is asyncio.current_task():
                del self._pumps[replica.replica_id]
        if self._on(replica):  # it ended idle just as a stream opened: that stream needs one
            self._ensure_pump(replica)

    def _on(self, replica: ReplicaRecord) -> list[str]:
        return [rid for rid, (replica_id, _) in self._streams.items() if replica_id == replica.replica_id]
