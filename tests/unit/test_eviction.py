"""Making room (issue 9): idle replicas unloaded on the node the rules prefer, LRU first,
the fewest that free enough; keep_alive expiry. Real `place()`, the reference home lab.

Factories are test_placement's: a model of `w` GiB needs w + 0.5 GiB VRAM whole on a GPU
and 1 GiB RAM; margins are the defaults (a 6 GiB card gives 5.7 GiB, the 16 GiB card 15.2).
Running replicas are subtracted from the free figures, as the agents measure them.
"""

from __future__ import annotations

import pytest

from orchestrator.core.eviction import EXACT_SEARCH_MAX, Evictable, RoomPlan, expired, expiry_reason, plan_room
from orchestrator.core.hardware import GIB
from orchestrator.core.placement import Assignment, Unplaced, place
from tests.unit.test_placement import demand, home_lab, linear_need, node

NOW = 10_000.0
MINUTE = 60.0


# ---------------------------------------------------------------- factories


def loaded(model: str, node_name: str, weights_gib: float, replica: int = 0) -> Assignment:
    """A replica whole on the node's GPU, holding what the need function says."""
    need = linear_need(weights_gib / 32, 32)(32)
    return Assignment(model=model, replica=replica, node=node_name, gpu_index=0, gpu_layers=32, n_layers=32,
                      gpu_bytes=need.gpu_bytes, ram_bytes=need.ram_bytes, kind="gpu")


def idle(a: Assignment, minutes_ago: float, keep_alive_s: float | None = None, **measured) -> Evictable:
    return Evictable(assignment=a, last_used=NOW - minutes_ago * MINUTE, keep_alive_s=keep_alive_s, **measured)


def lab_running(*running: Assignment):
    """The home lab with `running` replicas' memory already out of the free figures."""
    nodes = home_lab()
    out = []
    for n in nodes:
        mine = [a for a in running if a.node == n.name]
        gpu = n.gpus[0]
        vram_free = gpu.vram_total_bytes - sum(a.gpu_bytes for a in mine)
        ram_free = n.ram_free_bytes - sum(a.ram_bytes for a in mine)
        out.append(node(n.name, vram_gib=gpu.vram_total_bytes / GIB, ram_gib=n.ram_total_bytes / GIB,
                        vram_free_gib=vram_free / GIB, ram_free_gib=ram_free / GIB))
    return out


def plan(running, evictable, want, **kwargs):
    return plan_room(lab_running(*running), want, evictable, NOW, current=running, **kwargs)


def victims_of(p: RoomPlan) -> list[str]:
    return [a.model for a in p.victims]


# ---------------------------------------------------------------- no eviction needed


def test_no_victims_when_the_model_fits_as_it_is():
    p = plan([], [], demand("chat", 4))
    assert p == RoomPlan("laptop-1", (), p.assignment, ())
    assert (p.assignment.node, p.assignment.kind) == ("laptop-1", "gpu")


def test_no_victims_when_another_node_holds_it_whole_even_if_the_rules_would_prefer_the_idle_ones_node():
    # With old unloaded, laptop-1 would tie laptop-2 and win by name; laptop-2 has room now.
    old = loaded("old", "laptop-1", 4)
    p = plan([old], [idle(old, 60)], demand("chat", 2))
    assert (p.node, p.victims) == ("laptop-2", ())


def test_no_victims_when_the_desktop_holds_a_small_model_whole_while_idle_models_fill_the_laptops():
    a, b = loaded("a", "laptop-1", 4.5), loaded("b", "laptop-2", 4.5)
    p = plan([a, b], [idle(a, 60), idle(b, 30)], demand("chat", 4))
    assert (p.node, p.assignment.kind, p.victims) == ("desktop", "gpu", ())


def test_a_demand_already_running_stays_without_victims():
    chat, other = loaded("chat", "desktop", 12), loaded("other", "desktop", 2)
    p = plan([chat, other], [idle(other, 90)], demand("chat", 12))
    assert (p.assignment, p.victims) == (chat, ())


# ---------------------------------------------------------------- LRU, fewest, in flight


def full_laptops() -> list[Assignment]:
    """Both laptops busy with 5 GiB models (0.5 GiB of VRAM left): never evictable here."""
    return [loaded("busy-1", "laptop-1", 5), loaded("busy-2", "laptop-2", 5)]


def test_least_recently_used_idle_replica_goes_first_with_its_reason_in_numbers():
    coder, writer = loaded("coder", "desktop", 6), loaded("writer", "desktop", 6)  # 6.5 GiB each, 3.0 free
    p = plan(full_laptops() + [coder, writer], [idle(writer, 5), idle(coder, 15)], demand("chat", 5))
    assert (p.node, victims_of(p), p.assignment.kind, p.assignment.gpu_layers) == ("desktop", ["coder"], "gpu", 32)
    assert p.reasons == (
        "unloaded coder (idle 15m, 6.5 GiB VRAM) on desktop to make room for chat: "
        "needs 5.5 GiB VRAM for 32 layers, 2.2 GiB usable (3.0 GiB free)",
    )


def test_evicts_to_load_whole_rather_than_split_or_run_on_cpu():
    coder = loaded("coder", "desktop", 10)
    lab_before = lab_running(*full_laptops(), coder)
    assert place(lab_before, [demand("chat", 8)]).assignments[0].kind == "split"  # what it would get as it is
    p = plan(full_laptops() + [coder], [idle(coder, 1)], demand("chat", 8))
    assert (victims_of(p), p.assignment.kind) == (["coder"], "gpu")


def test_one_later_replica_that_frees_enough_beats_an_lru_prefix_of_two():
    small, big, mid = loaded("small", "desktop", 2), loaded("big", "desktop", 8), loaded("mid", "desktop", 3)
    evictable = [idle(small, 30), idle(big, 20), idle(mid, 10)]  # 0.7 GiB usable; chat needs 7.5
    p = plan(full_laptops() + [small, big, mid], evictable, demand("chat", 7))
    assert victims_of(p) == ["big"]


def test_fewest_victims_then_the_most_recently_used_stays_loaded():
    # a (oldest) 2.5, b 3.5, c 3.5, d (newest) 5.5 GiB; 0.2 usable; chat needs 7.0.
    # Pairs that work: a+d, b+c, b+d, c+d; b+c keeps d, the most recently used.
    a, b, c, d = (loaded(m, "desktop", w) for m, w in [("a", 2), ("b", 3), ("c", 3), ("d", 5)])
    evictable = [idle(d, 1), idle(c, 2), idle(b, 3), idle(a, 4)]
    p = plan(full_laptops() + [a, b, c, d], evictable, demand("chat", 6.5))
    assert victims_of(p) == ["b", "c"]  # least recently used first
    assert len(p.reasons) == 2 and p.reasons[0].startswith("unloaded b (idle 3m, 3.5 GiB VRAM) on desktop")


def test_a_replica_with_work_in_flight_is_never_evicted_even_when_least_recently_used():
    busy, spare = loaded("busy", "desktop", 8), loaded("spare", "desktop", 4)  # busy is not evictable
    p = plan(full_laptops() + [busy, spare], [idle(spare, 1)], demand("chat", 6))
    assert (p.node, victims_of(p), p.assignment.kind) == ("desktop", ["spare"], "gpu")


def test_in_flight_replicas_block_the_room_then_the_model_runs_as_the_rules_allow_without_victims():
    busy = loaded("busy", "desktop", 12)
    p = plan(full_laptops() + [busy], [], demand("chat", 5))
    assert p.victims == () and p.assignment.kind in ("split", "cpu")


def test_a_replica_of_the_demanded_model_is_not_unloaded_to_load_another_of_it():
    chat0 = loaded("chat", "desktop", 10)
    p = plan(full_laptops() + [chat0], [idle(chat0, 60)], demand("chat", 10, replica=1))
    assert p.victims == () and p.assignment.kind == "split"


# ---------------------------------------------------------------- where, and when not at all


def test_victims_are_taken_on_the_node_the_rules_prefer_only():
    # Unloading the older desktop model would also make room, but rule 1 prefers the
    # smallest card: laptop-1's newer idle model goes instead.
    old, young = loaded("old", "desktop", 5.5), loaded("young", "laptop-1", 5)
    running = [loaded("busy-d", "desktop", 9), old, young, loaded("busy-2", "laptop-2", 5)]
    p = plan(running, [idle(old, 120), idle(young, 2)], demand("chat", 5))
    assert (p.node, victims_of(p), p.assignment.kind) == ("laptop-1", ["young"], "gpu")
    assert all(a.node == "laptop-1" for a in p.victims)


def test_split_model_gets_the_layers_it_would_have_with_every_idle_model_gone():
    x, y = loaded("x", "desktop", 3), loaded("y", "desktop", 3)
    p = plan(full_laptops() + [x, y], [idle(x, 9), idle(y, 3)], demand("huge", 32))
    # 15.2 usable with both gone: 14 layers, as test_placement computes for the empty lab.
    assert (p.node, victims_of(p), p.assignment.kind, p.assignment.gpu_layers) == ("desktop", ["x", "y"], "split", 14)


def test_unplaced_with_reasons_when_even_evicting_everything_will_not_fit():
    a = loaded("a", "desktop", 4)
    running = full_laptops() + [a]
    want = demand("huge", 99, n_layers=33)
    got = plan(running, [idle(a, 10)], want)
    assert isinstance(got, Unplaced)
    assert got.reasons == place(lab_running(*running), [want]).unplaced[0].reasons
    assert set(got.reasons) == {"desktop", "laptop-1", "laptop-2"}


def test_measured_memory_of_a_victim_counts_over_its_estimate():
    # The estimate says 4.5 GiB; the replica measured 6.0 GiB (the free figure agrees).
    spare = loaded("spare", "desktop", 4)
    lab = lab_running(*full_laptops())
    lab[0] = node("desktop", vram_gib=16, ram_gib=64, vram_free_gib=16 - 8.5 - 6.0, ram_free_gib=62)
    want = demand("chat", 6)  # 6.5 GiB; 0.7 usable + 6.0 measured = 6.7, + 4.5 estimated = 5.2
    by_estimate = plan_room(lab, want, [idle(spare, 5)], NOW)
    assert (victims_of(by_estimate), by_estimate.assignment.kind) == (["spare"], "split")
    measured = plan_room(lab, want, [idle(spare, 5, gpu_bytes=6 * GIB)], NOW)
    assert (measured.node, victims_of(measured), measured.assignment.kind) == ("desktop", ["spare"], "gpu")
    assert "(idle 5m, 6.0 GiB VRAM)" in measured.reasons[0]


def test_many_idle_replicas_fall_back_to_an_lru_prefix():
    # Ten old 1.0 GiB replicas and a newer 4.5 GiB one: the exact search would take the big
    # one alone; past EXACT_SEARCH_MAX the LRU-first prefix that frees enough goes instead.
    small = [loaded(f"m{i:02d}", "desktop", 0.5) for i in range(EXACT_SEARCH_MAX)]
    big = loaded("big", "desktop", 4)
    evictable = [idle(a, 100 - i) for i, a in enumerate(small)] + [idle(big, 1)]
    p = plan(full_laptops() + small + [big], evictable, demand("chat", 4))  # 4.5 needed, 0.7 usable
    assert victims_of(p) == ["m00", "m01", "m02", "m03"]
    exact = plan(full_laptops() + small[1:] + [big], evictable[1:], demand("chat", 4))  # one fewer: exact
    assert victims_of(exact) == ["big"]


# ---------------------------------------------------------------- keep_alive expiry


@pytest.mark.parametrize(
    "keep_alive_s, idle_minutes, gone",
    [
        (None, 10_000, False),  # for ever
        (0, 0, True),  # unload at once
        (300, 4.9, False),
        (300, 5, True),
        (300, 6, True),
    ],
)
def test_a_replica_expires_once_idle_for_its_keep_alive(keep_alive_s, idle_minutes, gone):
    e = idle(loaded("m", "laptop-1", 2), idle_minutes, keep_alive_s)
    assert expired([e], NOW) == ([e] if gone else [])


def test_expired_lists_least_recently_used_first_with_reasons():
    a, b = loaded("a", "laptop-1", 2), loaded("b", "laptop-2", 2, replica=1)
    newer, older = idle(a, 31, 1800), idle(b, 90, 3600)
    assert expired([newer, older], NOW) == [older, newer]
    assert expiry_reason(older, NOW) == "unloaded b replica 1 (idle 1h30m, keep_alive 1h) on laptop-2"
    assert expiry_reason(newer, NOW) == "unloaded a (idle 31m, keep_alive 30m) on laptop-1"
