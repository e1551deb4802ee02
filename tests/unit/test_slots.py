import pytest

from orchestrator.core.slots import SlotChoice, SlotSnapshot, choose_slot, reusable_prefix, runs

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
        # a short prefix counts only where it adds no run of busy slots
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


def test_with_no_slot_busy_any_reusable_prefix_counts():
    idle = [slot(0, PROMPT[:5] + [1] * 20), slot(1), slot(2)]
    assert choose_slot(idle, PROMPT, min_reuse=16) == SlotChoice(0, 5)
