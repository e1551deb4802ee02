"""Which idle slot of a replica takes a request.

Two things are at stake. The prompt cache: a slot whose KV holds a long prefix of the
prompt serves those tokens without prefilling them again. And contiguity: llama.cpp gives
each slot its own KV stream and decodes a round in one graph per run of consecutive busy
slot ids, so a busy set {0, 2, 5} costs three graphs a round where {0, 1, 2} costs one
(measured on 2 CPU cores, Gemma 3 270M: 4 tokens in one graph 33 ms, in four 42 ms).

So: a slot whose reusable prefix is at least `min_reuse` tokens wins, the longest first;
a shorter prefix counts only where taking that slot adds no more runs than the best
alternative would. Then the slot that adds the fewest runs (filling a hole first), then
the one whose cache loses the fewest tokens (an empty slot loses none), then the least
recently used.

A prefix is only reusable where the slot still holds what the next token attends to: a
model with sliding-window attention keeps only the last `n_swa` positions of its SWA
layers (llama.cpp overwrites older cells), so reusing a prefix of n tokens needs the
slot's oldest kept position to be at most n - n_swa. At least one prompt token is always
decoded again, for the logits the first answer token is sampled from.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

MIN_REUSE_TOKENS = 32


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


def runs(ids: Collection[int]) -> int:
    """Maximal runs of consecutive ids: {0, 1, 3} has two."""
    present = set(ids)
    return sum(1 for i in present if i - 1 not in present)


def choose_slot(idle: Sequence[SlotSnapshot], prompt: Sequence[int], n_swa: int = 0, busy: Collection[int] = (),
                min_reuse: int = MIN_REUSE_TOKENS) -> SlotChoice | None:
    """The idle slot for `prompt` (see the module's rules); None when no slot is idle."""
    if not idle:
        return None
    added = {s.slot_id: runs({*busy, s.slot_id}) for s in idle}
    fewest = min(added.values())

    def key(slot: SlotSnapshot) -> tuple:
        reused = reusable_prefix(slot, prompt, n_swa)
        counted = reused if reused >= min_reuse or added[slot.slot_id] == fewest else 0
        return (-counted, added[slot.slot_id], len(slot.tokens) - counted, slot.last_used)

    best = min(idle, key=key)
    return SlotChoice(best.slot_id, reusable_prefix(best, prompt, n_swa))  # what it holds is reused all the same
