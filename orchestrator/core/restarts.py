"""When a crashed replica starts again: exponential backoff, then `failed` for a cool-down.

Pure: crash times in (one monotonic clock's seconds), a decision out. A replica that dies
(killed, aborted, out of memory, or its load died) is started again after 1, 2, 4, ... s
(at most `max_s`); after `max_crashes` crashes within `window_s` it is `failed` with its
last reason until `cool_down_s` have passed, or until the nodes change (the controller
decides that), so one bad model never keeps a node busy restarting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 1.0
    max_s: float = 60.0
    window_s: float = 600.0
    max_crashes: int = 5
    cool_down_s: float = 600.0


DEFAULT_POLICY = RestartPolicy()


@dataclass(frozen=True)
class RestartDecision:
    failed: bool  # too many crashes: failed until `at`
    at: float  # when it may be started again
    crashes: int  # within the window, this one included

    def describe(self, now: float, reason: str) -> str:
        wait = max(0.0, self.at - now)
        if self.failed:
            return f"crashed {self.crashes} times in a row; tried again in {wait / 60:.0f} min or when a node joins: {reason}"
        return f"crashed ({reason}); starting again in {wait:.0f} s (crash {self.crashes})"


def after_crash(crash_times: Sequence[float], now: float, policy: RestartPolicy = DEFAULT_POLICY) -> RestartDecision:
    """The decision after a crash at `now`; `crash_times` are the earlier ones (any order)."""
    recent = sorted(t for t in crash_times if now - t <= policy.window_s) + [now]
    n = len(recent)
    if n >= policy.max_crashes:
        return RestartDecision(True, now + policy.cool_down_s, n)
    return RestartDecision(False, now + min(policy.max_s, policy.base_s * 2 ** (n - 1)), n)
