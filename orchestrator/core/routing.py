"""Which replica takes a request: the ready one with the fewest requests in flight.

Each replica runs one request and holds a bounded queue behind it; when every replica is
full the answer is "none", and the gateway says 503 with Retry-After instead of piling up.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def choose_replica(ready: Sequence[T], in_flight: Callable[[T], int], queue_per_replica: int) -> T | None:
    """Fewest in flight wins (first listed on ties); None when all hold 1 running + a full queue."""
    best = min(ready, key=in_flight, default=None)
    if best is None or in_flight(best) >= 1 + queue_per_replica:
        return None
    return best
