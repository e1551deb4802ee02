"""Which idle slot of a replica takes a request: the one whose cached tokens share the
longest prefix with the prompt (its KV is reused, only the rest is prefilled); with no
useful prefix anywhere, an empty slot, else the least recently used one, so that the
caches most likely to be asked for again stay.

A prefix is only reusable when the slot still holds what the next token attends to: a
model with sliding-window attention keeps only the last `n_swa` positions of its SWA
layers (llama.cpp overwrites older cells), so reusing a prefix of n tokens needs the
slot's oldest kept position to be at most n - n_swa. At least one prompt token is always
decoded again, for the logits the first answer token is sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotSnapshot:
    slot_id: int
    tokens: Sequence[int]  # what the slot's KV holds, position by position
    last_used: int  # a counter: larger is more recent
    oldest_pos: int = 0  # oldest position its KV still holds (SWA layers); -1 when it holds none


@dataclass(frozen=True)
class SlotChoice:
    slot_id: int
    reused_tokens: int  # prompt tokens served from the slot's KV; prefill starts here


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(slot: SlotSnapshot, prompt: Sequence[int], n_swa: int) -> int:
    """Tokens of `prompt` this slot can serve from its KV (never the whole prompt)."""
    n = min(common_prefix_length(slot.tokens, prompt), len(prompt) - 1)
    if n <= 0:
        return 0
    if n_swa > 0 and slot.oldest_pos > max(0, n - n_swa):
        return 0  # the window before position n was overwritten
    return n


def choose_slot(idle: Sequence[SlotSnapshot], prompt: Sequence[int], n_swa: int = 0) -> SlotChoice | None:
    """Longest reusable prefix wins (ties: the slot that discards fewest cached tokens, then
    the least recently used); else an empty slot; else the least recently used. None when
    no slot is idle."""
    if not idle:
        return None
    scored = [(reusable_prefix(s, prompt, n_swa), s) for s in idle]
    reused, best = max(scored, key=lambda p: (p[0], p[0] - len(p[1].tokens), -p[1].last_used))
    if reused > 0:
        return SlotChoice(best.slot_id, reused)
    empty = [s for s in idle if not s.tokens]
    pick = empty[0] if empty else min(idle, key=lambda s: s.last_used)
    return SlotChoice(pick.slot_id, 0)
