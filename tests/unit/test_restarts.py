import pytest

from orchestrator.core.restarts import RestartPolicy, after_crash

POLICY = RestartPolicy(base_s=1, max_s=8, window_s=100, max_crashes=5, cool_down_s=300)


@pytest.mark.parametrize(
    "earlier, now, failed, wait",
    [
        ([], 1000, False, 1),  # first crash: again in 1 s
        ([990], 1000, False, 2),
        ([980, 990], 1000, False, 4),
        ([970, 980, 990], 1000, False, 8),
        ([960, 970, 980, 990], 1000, True, 300),  # the fifth within the window: failed, cool-down
        ([800, 850, 880, 890], 1000, False, 1),  # all older than the window: a fresh start
        ([850, 950, 960, 970], 1000, False, 8),  # three in the window + this one: capped at max_s
    ],
)
def test_backoff_doubles_then_fails_for_a_cool_down(earlier, now, failed, wait):
    decision = after_crash(earlier, now, POLICY)
    assert decision.failed is failed
    assert decision.at - now == wait


def test_the_description_says_when_and_why():
    assert "starting again in 2 s" in after_crash([990], 1000, POLICY).describe(1000, "SIGKILL")
    text = after_crash([960, 970, 980, 990], 1000, POLICY).describe(1000, "out of memory")
    assert "crashed 5 times" in text and "out of memory" in text and "5 min" in text
