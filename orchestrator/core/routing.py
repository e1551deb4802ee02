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


RECONCILE_QUIET_S = 30.0  # no request started or ended on the replica for this long


def reconciled_in_flight(counted: int, on_replica: int | None, quiet_for_s: float,
                         quiet_s: float = RECONCILE_QUIET_S) -> int | None:
    """The gateway's in-flight count of a replica corrected by the replica's own count, or
    None to keep it. Only a count the replica cannot explain is dropped: the replica holds no
    request at all while the gateway counts some and none started or ended for `quiet_s` (a
    request on its way to the replica is at most seconds old; one the replica holds is in its
    own count). What remains is a slot a lost path never released."""
    if on_replica is None or on_replica != 0 or counted <= 0 or quiet_for_s < quiet_s:
        return None
    return 0
