import pytest

from orchestrator.core.slots import SlotChoice, SlotSnapshot, assign_slots, choose_slot, reusable_prefix, runs

PROMPT = list(range(100, 200))  # 100 tokens


def slot(slot_id: int, tokens=(), last_used: int = 0, oldest_pos: int = 0) -> SlotSnapshot:
    return SlotSnapshot(slot_id, list(tokens), last_used, oldest_pos)


@pytest.mark.parametrize(
    "idle, busy, expected",
    [
        # the longest reusable prefix wins, wherever it is
        ([slot(0, PROMPT[:10]), slot(5, PROMPT[:60] + [1, 2])], (), SlotChoice(5, 60)),
        ([slot(1, PROMPT[:40]), slot(6, PROMPT[:80])], (2, 3), SlotChoice(6, 80)),
        # never the whole prompt: its last token is decoded again for the first answer token's logits
        ([slot(2, PROMPT + [7, 8])], (), SlotChoice(2, 99)),
        # a short prefix never outweighs a new run of busy slots; a long one does
        ([slot(1, PROMPT[:5]), slot(6, PROMPT[:12])], (2, 3), SlotChoice(1, 5)),
        ([slot(1, [9] * 5), slot(6, PROMPT[:12])], (2, 3), SlotChoice(1, 0)),
        ([slot(1, [9] * 5), slot(6, PROMPT[:20])], (2, 3), SlotChoice(6, 20)),
        # nothing reusable: fill a hole before extending a run, extend before starting a new one
        ([slot(1), slot(4), slot(7)], (0, 2, 3), SlotChoice(1, 0)),
        ([slot(4, [9] * 50, last_used=9), slot(7)], (2, 3), SlotChoice(4, 0)),
        # then the slot whose cache loses fewest tokens (empty first), then the least recently used
        ([slot(0, [9] * 50), slot(3), slot(5, [9] * 50)], (), SlotChoice(3, 0)),
        ([slot(0, [9] * 50, last_used=4), slot(5, [9] * 50, last_used=2)], (), SlotChoice(5, 0)),
        ([], (), None),
    ],
)
def test_slot_choice_weighs_the_prompt_cache_against_runs_of_busy_slots(idle, busy, expected):
    assert choose_slot(idle, PROMPT, busy=busy, min_reuse=16) == expected


@pytest.mark.parametrize(
    "held, oldest_pos, n_swa, expected",
    [
        (PROMPT[:60], 0, 0, 60),
        (PROMPT[:60], 0, 512, 60),
        (PROMPT[:60], 30, 512, 0),  # the sliding window before position 60 is gone
        (PROMPT[:60], 30, 20, 60),  # a window of 20 needs positions 40.. only
        ([], -1, 512, 0),
        ([5] + PROMPT[1:], 0, 0, 0),
    ],
)
def test_a_prefix_is_reusable_only_while_the_slot_holds_its_attention_window(held, oldest_pos, n_swa, expected):
    assert reusable_prefix(slot(0, held, oldest_pos=oldest_pos), PROMPT, n_swa) == expected


@pytest.mark.parametrize("ids, expected", [((), 0), ((3,), 1), ((0, 1, 2), 1), ((0, 2, 3, 7), 3)])
def test_runs_count_maximal_stretches_of_consecutive_slot_ids(ids, expected):
    assert runs(ids) == expected


def test_a_short_prefix_never_evicts_a_cache_but_is_reused_where_nothing_is_lost():
    """A tag request beside a chat shares only the template's opening with it: it takes an
    empty slot, not the chat's (whose history would be prefilled again at the next turn)."""
    chat = PROMPT[:5] + [1] * 200
    assert choose_slot([slot(0, chat), slot(1), slot(2)], PROMPT, min_reuse=16) == SlotChoice(1, 0)
    assert choose_slot([slot(0, chat), slot(1, PROMPT[:5]), slot(2)], PROMPT, min_reuse=16) == SlotChoice(1, 5)
    # every slot holds something: the one that loses least, what a short prefix saves counted
    held = [slot(0, chat), slot(1, [2] * 30), slot(2, PROMPT[:5] + [3] * 27)]
    assert choose_slot(held, PROMPT, min_reuse=16) == SlotChoice(2, 5)
    # a short chat's next turn keeps its slot though the answer, tokenized again, differs at the end
    short_chat = slot(0, PROMPT[:12] + [4, 4, 4])
    assert choose_slot([slot(1), short_chat], PROMPT, min_reuse=16) == SlotChoice(0, 12)
    # a short prompt asked again (regenerate) finds its slot, whose old answer it replaces
    answered = slot(0, PROMPT[:13] + [5] * 40)
    assert choose_slot([slot(1), answered], PROMPT[:14], min_reuse=16) == SlotChoice(0, 13)


def test_requests_that_start_together_each_find_the_slot_that_holds_their_prompt():
    """A newcomer first in the queue shares a template's opening with every slot; taken one
    by one it would take the slot of a waiting request's whole prompt."""
    opening = [1, 2, 3, 4, 5]
    a, b, new = opening + list(range(10, 50)), opening + list(range(60, 100)), opening + list(range(200, 240))
    # every slot holds a cache; the chats' lose least, so the newcomer alone would take one
    idle = [slot(0, a + [7] * 9, last_used=1), slot(1, b + [8] * 9, last_used=2), slot(2, [9] * 100),
            slot(3, [9] * 100)]
    assert choose_slot(idle, new, min_reuse=16) == SlotChoice(0, 5)
    assert assign_slots(idle, [new, b, a], min_reuse=16) == [SlotChoice(2, 0), SlotChoice(1, 44), SlotChoice(0, 44)]


def test_a_short_prefix_keeps_its_slot_when_the_requests_fill_every_idle_slot():
    """Below min_reuse a prefix yields to a run of busy slots, but where the requests take
    every idle slot the runs are the same whoever sits where."""
    a, b, c, d = (list(range(k, k + 34)) for k in (100, 200, 300, 400))
    idle = [slot(0, a[:31]), slot(1, b[:31]), slot(2, c), slot(3, d)]
    prompts = [c + [1], d + [1], a[:31] + [1], b[:31] + [1]]  # a and b reuse 31 tokens, c and d 34
    assert assign_slots(idle, prompts, min_reuse=32) == [SlotChoice(2, 34), SlotChoice(3, 34), SlotChoice(0, 31),
                                                         SlotChoice(1, 31)]


def test_the_slots_of_requests_that_start_together_keep_the_busy_ones_together():
    """Without a prefix worth a run of its own, requests choose in queue order: the first
    fills the hole beside the busy slots, which then makes the second's short prefix free."""
    idle = [slot(0, PROMPT[:20]), slot(1), slot(4), slot(5)]
    assert assign_slots(idle, [[1] * 30, PROMPT], busy=(2, 3), min_reuse=32) == [SlotChoice(1, 0), SlotChoice(0, 20)]
    with pytest.raises(ValueError, match="3 requests for 2 idle slots"):
        assign_slots(idle[:2], [PROMPT] * 3)


def test_with_a_sliding_window_the_seating_reuses_the_most_in_all():
    """Slot 1 lost the start of y's window: y reuses 15 tokens in slot 0 and none in slot 1,
    x 20 in slot 0 or 18 in slot 1. The longest prefix first would reuse 20 in all; y in
    slot 0 and x in slot 1 reuse 33."""
    base = list(range(1000, 1100))
    x, y = base[:20] + [1] * 5, base[:15] + [2] * 5
    idle = [slot(0, base[:20] + [9]), slot(1, base[:18], oldest_pos=8)]
    assert assign_slots(idle, [y, x], n_swa=10, min_reuse=32) == [SlotChoice(0, 15), SlotChoice(1, 18)]
