"""The fleet's event log: what it did and why (placed, copied, loaded, evicted, unloaded
idle, node gone and back, a replica crashed, moved back home, wake sent...).

A bounded ring of plain dicts `{"id", "at", "kind", "model", "node", "reason", ...facts}`.
Ids grow by one with each event and are never reused, so a reader that saw up to id N
asks for what came `since` N (`GET /api/events?since=N`, `homefleet events --follow`).
They begin at the log's start time in milliseconds, so a restarted gateway's ids go on
above the old ones (a run would need more than an event a millisecond to catch up with
the next): a follower asking `since` an id of the run before gets all of the new one.
Facts beyond the reason (`seconds`, `bytes`) are for listeners such as the metrics.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

EVENTS_KEPT = 500

Listener = Callable[[dict], None]


class EventLog:
    def __init__(self, kept: int = EVENTS_KEPT, clock: Callable[[], float] = time.time,
                 first_id: int | None = None) -> None:
        """`first_id`: the first event's id is the one after it; by default the start time
        in milliseconds (by `clock`)."""
        self._events: deque[dict] = deque(maxlen=kept)
        self._clock = clock
        self.last_id = int(clock() * 1000) if first_id is None else first_id
        self.listeners: list[Listener] = []

    def record(self, kind: str, model: str, node: str | None, reason: str, **facts: object) -> dict:
        self.last_id += 1
        event = {"id": self.last_id, "at": self._clock(), "kind": kind, "model": model, "node": node,
                 "reason": reason, **facts}
        self._events.append(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # an observer's bug must not stop the controller's work
                log.exception("event listener failed on %s", kind)
        return event

    def since(self, event_id: int | None = None, limit: int = EVENTS_KEPT) -> list[dict]:
        """Oldest first. Without `event_id`: the latest `limit`. With it: the first `limit`
        after it, so a reader paging forward misses none the ring still holds. An id from
        the future (the clock was set back before a restart) reads as 0: everything kept."""
        if event_id is None:
            return list(self._events)[-limit:] if limit > 0 else []
        if event_id > self.last_id:
            event_id = 0
        out = []
        for event in self._events:
            if event["id"] > event_id:
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    def next_since(self, returned: list[dict]) -> int:
        """What a reader passes as `since` next: the newest id it got, else the log's newest
        (with a `limit` of one at least, nothing returned means nothing newer)."""
        return returned[-1]["id"] if returned else self.last_id

    def __iter__(self) -> Iterator[dict]:
        return iter(self._events)

    def __reversed__(self) -> Iterator[dict]:
        return reversed(self._events)

    def __len__(self) -> int:
        return len(self._events)
