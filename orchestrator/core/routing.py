"""Which replica takes a request: one with a free slot, else the shortest queue.

A replica decodes `slots` requests at once (its batched engine) and holds a bounded queue
behind them; when every replica is full the answer is "none", and the gateway says 503
with Retry-After instead of piling up.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def choose_replica(ready: Sequence[T], in_flight: Callable[[T], int], queue_per_replica: int,
                   slots: Callable[[T], int] = lambda _: 1) -> T | None:
    """The most free slots wins, then the shortest queue (in flight beyond the slots), then
    the first listed; None when every replica holds its slots and a full queue."""
    best = min(ready, key=lambda r: in_flight(r) - slots(r), default=None)
    if best is None or in_flight(best) >= slots(best) + queue_per_replica:
        return None
    return best


def overload_retry_after_s(waiting: int, slots: int, seconds_per_request: float = 2.0) -> int:
    """Retry-After for a 503 when every queue is full: about when the queue ahead drains
    (1-30 s), at a few seconds a request per slot."""
    return max(1, min(30, round(waiting / max(1, slots) * seconds_per_request)))
