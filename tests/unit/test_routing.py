import pytest

from orchestrator.core.routing import choose_replica


@pytest.mark.parametrize(
    "loads, queue, expected",
    [
        ({"a": 0}, 4, "a"),
        ({"a": 3, "b": 1, "c": 2}, 4, "b"),
        ({"a": 1, "b": 1}, 4, "a"),  # ties go to the first listed
        ({"a": 5, "b": 5}, 4, None),  # 1 running + 4 queued each: full
        ({"a": 5, "b": 4}, 4, "b"),
        ({}, 4, None),
    ],
)
def test_request_goes_to_the_ready_replica_with_fewest_in_flight_or_none_when_all_full(loads, queue, expected):
    assert choose_replica(list(loads), loads.__getitem__, queue) == expected
