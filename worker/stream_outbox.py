"""A replica's streams on their way to the gateways: every stream's items for one gateway (a
"consumer") leave together, in one message of the replica's `pump` (worker/replica.py).

Each message between processes costs the decoding threads CPU on a small machine: a Ray
streaming item of a few hundred bytes took 0.8 ms of CPU in all (0.5 in the asyncio reader,
0.3 in the actor) on the 2-core test machine. So the replica sends one message a tick for
all of a gateway's streams, not one per stream: at once when an item is urgent (a stream's
first item, its first text, its end), else at most every `every_s()` seconds. No Ray here.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

END = None  # the item after a stream's last one


class StreamOutbox:
    """`stale_after_s`: what is left for a consumer that has had no pump (and no open stream)
    for this long is dropped (a gateway that went away, or replaced its consumer id)."""

    def __init__(self, every_s: Callable[[], float], clock: Callable[[], float] = time.monotonic,
                 stale_after_s: float = 300.0) -> None:
        self._every_s = every_s
        self._clock = clock
        self._stale_after_s = stale_after_s
        self._cond = threading.Condition()
        self._pending: dict[str, dict[str, list]] = {}  # consumer -> request id -> items not yet taken
        self._open: dict[str, set[str]] = {}  # consumer -> its streams that have not ended
        self._urgent: set[str] = set()  # consumers with an item to send at once
        self._sent_at: dict[str, float] = {}
        self._pumps: dict[str, object] = {}  # consumer -> its pump now (a newer one replaces an older)
        self._pumpless_since: dict[str, float] = {}

    def attach(self, consumer: str) -> object:
        """A pump for the consumer starts: the token its takes show. An older pump of the same
        consumer (its reader gone) ends at its next take, rather than take items nobody reads."""
        token = object()
        with self._cond:
            self._pumps[consumer] = token
            self._pumpless_since.pop(consumer, None)
            self._cond.notify_all()
        return token

    def detach(self, consumer: str, token: object) -> None:
        with self._cond:
            if self._pumps.get(consumer) is token:
                del self._pumps[consumer]
                self._pumpless_since[consumer] = self._clock()

    def open(self, consumer: str, request_id: str) -> None:
        with self._cond:
            self._open.setdefault(consumer, set()).add(request_id)
            self._cond.notify_all()

    def put(self, consumer: str, request_id: str, item, urgent: bool = False) -> None:
        with self._cond:
            pending = self._pending.setdefault(consumer, {})
            first = not pending  # the pump waits for a first item, then for its tick
            pending.setdefault(request_id, []).append(item)
            if urgent:
                self._urgent.add(consumer)
            if urgent or first:
                self._cond.notify_all()

    def end(self, consumer: str, request_id: str) -> None:
        """The stream is over: END follows its items, sent at once."""
        self.put(consumer, request_id, END, urgent=True)
        with self._cond:
            streams = self._open.get(consumer)
            if streams is not None:
                streams.discard(request_id)
                if not streams:
                    del self._open[consumer]
            now = self._clock()
            for stale in [c for c, since in self._pumpless_since.items()
                          if now - since > self._stale_after_s and not self._open.get(c)]:
                for table in (self._pending, self._sent_at, self._pumpless_since):
                    table.pop(stale, None)
                self._urgent.discard(stale)

    def open_streams(self, consumer: str) -> int:
        with self._cond:
            return len(self._open.get(consumer, ()))

    def take(self, consumer: str, idle_s: float, token: object | None = None) -> dict[str, list] | None:
        """The consumer's items, by request id (adjacent text joined), when they are due; None
        once it has had no stream open and nothing to take for `idle_s` seconds, or once a
        newer pump than `token`'s has attached."""
        with self._cond:
            idle_until = self._clock() + idle_s
            while True:
                now = self._clock()
                if token is not None and self._pumps.get(consumer) is not token:
                    return None
                if self._pending.get(consumer):
                    due = self._sent_at.get(consumer, float("-inf")) + self._every_s()
                    if consumer in self._urgent or now >= due:
                        self._urgent.discard(consumer)
                        self._sent_at[consumer] = now
                        return {rid: _joined(items) for rid, items in self._pending.pop(consumer).items()}
                    self._cond.wait(due - now)
                elif self._open.get(consumer):
                    idle_until = now + idle_s
                    self._cond.wait(idle_s)
                elif now >= idle_until:
                    self._urgent.discard(consumer)
                    self._sent_at.pop(consumer, None)
                    if token is not None:
                        self._pumps.pop(consumer, None)
                        self._pumpless_since[consumer] = now
                    return None
                else:
                    self._cond.wait(idle_until - now)


def _joined(items: list) -> list:
    """Adjacent non-empty bytes as one (an empty one is a stream's acceptance: kept alone)."""
    out: list = []
    for item in items:
        if isinstance(item, bytes) and item and out and isinstance(out[-1], bytes) and out[-1]:
            out[-1] += item
        else:
            out.append(item)
    return out
