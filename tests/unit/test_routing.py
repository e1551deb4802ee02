import pytest

from orchestrator.core.routing import RECONCILE_QUIET_S, choose_replica, reconciled_in_flight


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


@pytest.mark.parametrize(
    "loads, slots, queue, expected",
    [
        ({"a": 3, "b": 1}, {"a": 4, "b": 1}, 4, "a"),  # a has a free slot, b has none
        ({"a": 4, "b": 1}, {"a": 4, "b": 1}, 4, "a"),  # both full: equal queues, first listed
        ({"a": 6, "b": 2}, {"a": 4, "b": 1}, 4, "b"),  # a queues 2, b queues 1
        ({"a": 8, "b": 5}, {"a": 4, "b": 1}, 4, None),  # 4 slots + 4 queued; 1 slot + 4 queued
        ({"a": 7}, {"a": 4}, 4, "a"),
    ],
)
def test_request_goes_to_a_free_slot_then_the_shortest_queue(loads, slots, queue, expected):
    assert choose_replica(list(loads), loads.__getitem__, queue, slots.__getitem__) == expected


def test_retry_after_grows_with_the_queue_and_stays_bounded():
    from orchestrator.core.routing import overload_retry_after_s

    assert overload_retry_after_s(1, 4) == 1
    assert overload_retry_after_s(8, 1) == 16
    assert overload_retry_after_s(1000, 1) == 30


def test_a_replica_flushes_streams_less_often_as_more_decode():
    from worker.replica import _flush_interval

    assert [_flush_interval(n) for n in (1, 2, 4, 8, 64)] == [0.1, 0.1, 0.2, 0.25, 0.25]


def test_a_count_the_replica_cannot_explain_is_dropped_after_a_quiet_spell():
    assert reconciled_in_flight(counted=2, on_replica=0, quiet_for_s=RECONCILE_QUIET_S + 1) == 0


@pytest.mark.parametrize("counted, on_replica, quiet_for_s", [
    (2, 0, RECONCILE_QUIET_S - 1),  # a request may be on its way to the replica
    (2, 1, 600.0),  # the replica holds one: the other may be queued ahead of it in Ray
    (0, 0, 600.0),  # nothing to correct
    (1, None, 600.0),  # a replica that does not report its count
])
def test_a_count_the_replica_may_explain_is_kept(counted, on_replica, quiet_for_s):
    assert reconciled_in_flight(counted, on_replica, quiet_for_s) is None
