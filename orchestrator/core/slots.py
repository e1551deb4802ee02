"""Which idle slot of a replica takes a request.

Two things are at stake. The prompt cache: a slot whose KV holds a long prefix of the
prompt serves those tokens without prefilling them again. And contiguity: llama.cpp gives
each slot its own KV stream and decodes a round in one graph per run of consecutive busy
slot ids, so a busy set {0, 2, 5} costs three graphs a round where {0, 1, 2} costs one
(measured on 2 CPU cores, Gemma 3 270M: 4 tokens in one graph 33 ms, in four 42 ms).

So: a slot whose reusable prefix is at least `min_reuse` tokens wins, the longest first.
Then the slot that adds the fewest runs (filling a hole first), then the one where the
prefix reused most outweighs the cache lost beyond it (`REUSED_WEIGHT`; an empty slot:
neither), then the longer prefix, then the least recently used. So a short prefix never
takes a slot whose cache is worth more than it saves: Open WebUI's title and tag requests
share only the chat template's opening with the chat beside them, and taking the chat's
slot would prefill its whole history again next turn; a regenerated short prompt still
finds its slot, whose old answer it replaces.
Requests that start in the same round choose together (`assign_slots`), so that one does
not take the slot holding another's prompt.

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
# A prompt token reused now against the tokens of cache a slot would lose: the saving is
# certain, the loss counts only if that conversation comes back (taken as 1 in 4).
REUSED_WEIGHT = 4


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
    return assign_slots(idle, [prompt], n_swa, busy, min_reuse)[0] if idle else None


def assign_slots(idle: Sequence[SlotSnapshot], prompts: Sequence[Sequence[int]], n_swa: int = 0,
                 busy: Collection[int] = (), min_reuse: int = MIN_REUSE_TOKENS) -> list[SlotChoice]:
    """Slots for requests that start together (`prompts`, no more than `idle`), in
    `prompts`' order. Which slots: each request in turn by the module's rules, beside the
    slots busy and those chosen before it; those with a prefix of at least `min_reuse`
    first, the longest first, then the queue's order. Who sits where: the runs of busy
    slots depend on that set alone, so within it the longest prefixes are matched first.
    Taken one by one in queue order instead, a burst's newcomer that shares only a chat
    template's opening with a slot takes the slot that holds another waiting request's
    whole prompt, which is then prefilled again."""
    if len(prompts) > len(idle):
        raise ValueError(f"{len(prompts)} requests for {len(idle)} idle slots")
    reuse = [{s.slot_id: reusable_prefix(s, prompt, n_swa) for s in idle} for prompt in prompts]
    longest = [max(r.values(), default=0) for r in reuse]
    # those with a prefix worth a run of its own first, the longest first; then the queue's order
    order = sorted(range(len(prompts)), key=lambda i: -longest[i] if longest[i] >= min_reuse else 0)
    left, taken = list(idle), set(busy)
    first_choice: dict[int, int] = {}  # request -> the slot the rules gave it
    for i in order:
        best = _best_slot(left, reuse[i], taken, min_reuse)
        first_choice[i] = best.slot_id
        left.remove(best)
        taken.add(best.slot_id)
    seat = _most_reuse(first_choice, reuse)
    return [SlotChoice(seat[i], reuse[i][seat[i]]) for i in range(len(prompts))]  # what it holds is reused anyway


def _most_reuse(first_choice: dict[int, int], reuse: list[dict[int, int]]) -> dict[int, int]:
    """Requests matched to the slots of `first_choice` for the most tokens reused: the
    longest prefixes first (the best matching where prefixes nest, as they do without a
    sliding window), or the rules' own seating where that reuses more; then any two
    requests swap slots while that reuses more (a sliding window can make a shorter
    prefix the only reusable one)."""
    def total(seat: dict[int, int]) -> int:
        return sum(reuse[i][slot] for i, slot in seat.items())

    pairs = sorted(((i, slot) for i in first_choice for slot in first_choice.values()),
                   key=lambda p: (-reuse[p[0]][p[1]], first_choice[p[0]] != p[1]))
    greedy: dict[int, int] = {}
    for i, slot in pairs:
        if i not in greedy and slot not in greedy.values():
            greedy[i] = slot
    seat = greedy if total(greedy) > total(first_choice) else dict(first_choice)
    better = True
    while better:
        better = False
        for a in seat:
            for b in seat:
                if reuse[a][seat[b]] + reuse[b][seat[a]] > reuse[a][seat[a]] + reuse[b][seat[b]]:
                    seat[a], seat[b] = seat[b], seat[a]
                    better = True  # each swap adds reuse: this ends
    return seat


def _best_slot(idle: Sequence[SlotSnapshot], reuse: dict[int, int], busy: Collection[int],
               min_reuse: int) -> SlotSnapshot:
    def key(slot: SlotSnapshot) -> tuple:
        reused = reuse[slot.slot_id]
        lost = len(slot.tokens) - reused
        return (-reused if reused >= min_reuse else 0, runs({*busy, slot.slot_id}), lost - REUSED_WEIGHT * reused,
                -reused, slot.last_used)

    return min(idle, key=key)
