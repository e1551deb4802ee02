"""Exponential backoff for retries that go on as long as the program runs (a worker
rejoining its head): 1 s, 2 s, 4 s ... up to 30 s, back to 1 s once a try has lasted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0  # a try that lasted this long was a success: start again from initial_s
    _next_s: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        self._next_s = self.initial_s

    def next_delay_s(self) -> float:
        """The wait before the next try; each call doubles the one after, up to max_s."""
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next_s = self.initial_s

    def ran_for(self, seconds: float) -> None:
        """A try ended after `seconds`; one that lasted stable_s resets the schedule."""
        if seconds >= self.stable_s:
            self.reset()
