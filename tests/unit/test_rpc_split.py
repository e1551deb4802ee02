"""The plan of a split across machines' GPUs (llama.cpp RPC, issue 13) on the seed machines:
taken only where it beats the best single node by the margin, never on a node without RPC."""

from __future__ import annotations

import pytest

from orchestrator.core import catalog
from orchestrator.core.estimate import EstimateOptions
from orchestrator.core.rpc_split import SPLIT_MARGIN, SplitPlan
from orchestrator.fit import fit_report
from orchestrator.machines import load_machines

CODER_32B = catalog.lookup("qwen2.5-coder-32b")  # Q4_K_M: 19.8 GB of weights, 64 layers + output


def seed_machines(**changes) -> list:
    """The three reference machines; `changes` maps a name to fields to override."""
    return [m.model_copy(update=changes.get(m.name, {})) for m in load_machines()]


def report(nodes, ctx: int = 4096, model=CODER_32B):
    return fit_report(model, EstimateOptions(n_ctx=ctx), nodes, max_slots=1)


@pytest.mark.parametrize("ctx", [4096, 8192])
def test_the_32b_coder_splits_across_the_desktop_and_laptop_gpus_and_is_taken(ctx):
    r = report(seed_machines(), ctx)
    assert isinstance(r.split, SplitPlan) and r.split_taken
    parts = r.split.parts
    assert r.split.main_node == "desktop" and parts[-1].output  # the big card runs the replica and the output
    assert {p.node for p in parts[:-1]} <= {"laptop-1", "laptop-2"} and len(parts) >= 2
    assert sum(p.layers for p in parts) == CODER_32B.n_layers
    assert [p.first_layer for p in parts] == [sum(q.layers for q in parts[:i]) for i in range(len(parts))]
    assert all(p.gpu_bytes <= p.usable_vram_bytes for p in parts)
    best_single = max(n.tokens_per_s for n in report(seed_machines(), ctx).nodes)
    assert r.split.tokens_per_s >= SPLIT_MARGIN * best_single * 0.99


def test_at_4096_tokens_one_laptop_is_enough():
    r = report(seed_machines(), 4096)
    assert len(r.split.parts) == 2
    assert r.split.describe().startswith("desktop ") and r.split.describe().endswith("layers GPU (RPC)")


def test_a_split_not_clearly_faster_than_the_desktop_alone_is_not_taken():
    slow = {"link_rtt_ms": 150.0}  # a laptop in another house, over a VPN: a round trip a token
    r = report(seed_machines(**{"laptop-1": slow, "laptop-2": slow}))
    assert isinstance(r.split, SplitPlan) and not r.split_taken
    assert r.split.tokens_per_s < max(n.tokens_per_s for n in r.nodes)  # slower than the desktop alone
    assert "not taken" in r.split_why and "tokens/s" in r.split_why


def test_nodes_without_rpc_are_never_split_targets():
    r = report(seed_machines(**{"laptop-1": {"rpc": False}}))
    assert isinstance(r.split, SplitPlan) and "laptop-1" not in r.split.nodes
    assert report(seed_machines(**{"laptop-1": {"rpc": False}, "laptop-2": {"rpc": False}})).split is None


def test_a_model_whole_on_one_gpu_is_not_split():
    assert report(seed_machines(), model=catalog.lookup("llama-2-7b")).split is None


def test_a_model_too_big_for_every_gpu_together_says_so_in_numbers():
    r = report(seed_machines(), model=catalog.lookup("llama-2-70b"))
    assert isinstance(r.split, str) and not r.split_taken
    assert "usable VRAM" in r.split and "GiB" in r.split


def test_a_speed_factor_slows_the_split_cards_as_it_slows_a_single_node():
    """Calibration scales each card's reads, on both sides of the comparison; on a fast LAN the
    network is a small part, so the ratio hardly moves."""
    nodes = seed_machines()
    plain = fit_report(CODER_32B, EstimateOptions(n_ctx=4096), nodes, max_slots=1)
    scaled = fit_report(CODER_32B, EstimateOptions(n_ctx=4096), nodes, max_slots=1,
                        calibrations={n.name: 0.7 for n in nodes})
    assert scaled.split.tokens_per_s < 0.75 * plain.split.tokens_per_s
    ratio = lambda r: r.split.tokens_per_s / max(n.tokens_per_s for n in r.nodes)  # noqa: E731
    assert abs(ratio(scaled) / ratio(plain) - 1) < 0.05


def test_a_single_node_of_unknown_speed_is_no_reason_to_split():
    nodes = seed_machines(**{name: {"ram_bandwidth_gbps": None} for name in ("desktop", "laptop-1", "laptop-2")})
    r = report(nodes)
    assert isinstance(r.split, SplitPlan) and not r.split_taken and "not known" in r.split_why


# ---- placement: the live planner takes the split the same numbers choose


def place_on_seed_machines(ctx: int, nodes=None, model=CODER_32B, current=(), **splitter_args):
    from orchestrator.core.estimate import slot_needs
    from orchestrator.core.placement import ModelDemand, place, snapshot_from_hardware
    from orchestrator.split_planner import make_splitter

    nodes = nodes or seed_machines()
    opts = EstimateOptions(n_ctx=ctx)
    demand = ModelDemand(model=model.name, replica=0, n_layers=model.n_layers + 1, need=slot_needs(model, opts)(1))
    splitter = make_splitter({model.name: model}, lambda name, slots: EstimateOptions(n_ctx=ctx, n_slots=slots),
                             {n.name: n for n in nodes}, **splitter_args)
    return place([snapshot_from_hardware(n) for n in nodes], [demand], current=current, splitter=splitter)


@pytest.mark.parametrize("ctx", [4096, 8192])
def test_placement_splits_the_32b_coder_across_the_desktop_and_a_laptop(ctx):
    result = place_on_seed_machines(ctx)
    (a,) = result.assignments
    assert a.kind == "rpc" and a.node == "desktop" and a.gpu_index == 0
    assert {h.node for h in a.helpers} <= {"laptop-1", "laptop-2"} and a.helpers
    assert a.home_layers + sum(h.layers for h in a.helpers) == a.n_layers == CODER_32B.n_layers + 1
    assert a.describe().startswith("desktop ") and "(RPC)" in a.describe()
    assert a.tokens_per_s and "taken" in a.split_why
    plan = report(seed_machines(), ctx).split  # `homefleet fit` and placement agree
    assert a.describe() == plan.describe()


def test_a_split_reserves_vram_on_its_helpers_too():
    from orchestrator.core.placement import reservations_for

    (a,) = place_on_seed_machines(4096).assignments
    held = reservations_for([a])
    for h in a.helpers:
        assert held[h.node].vram_bytes_by_gpu[h.gpu_index] == h.gpu_bytes
    assert held["desktop"].vram_bytes_by_gpu[0] == a.gpu_bytes


def test_placement_keeps_the_desktop_split_when_the_rpc_split_is_slower():
    slow = {"link_rtt_ms": 150.0}
    (a,) = place_on_seed_machines(4096, seed_machines(**{"laptop-1": slow, "laptop-2": slow})).assignments
    assert a.kind == "split" and a.node == "desktop" and not a.helpers
    assert "not taken" in a.split_why


def test_placement_never_splits_onto_nodes_without_rpc():
    nodes = seed_machines(**{"laptop-1": {"rpc": False}, "laptop-2": {"rpc": False}})
    (a,) = place_on_seed_machines(4096, nodes).assignments
    assert a.kind == "split" and a.split_why is None  # not weighed: one RPC node is no split
    (b,) = place_on_seed_machines(4096, seed_machines(**{"laptop-1": {"rpc": False}})).assignments
    assert "laptop-1" not in b.nodes


def test_a_refused_split_falls_back_to_the_single_node_with_the_reason():
    (a,) = place_on_seed_machines(4096, refused={CODER_32B.name: "laptop-1: port 50052 is taken"}).assignments
    assert a.kind == "split" and "port 50052 is taken" in a.split_why


def test_a_measured_slow_split_is_not_taken_again():
    (first,) = place_on_seed_machines(4096).assignments
    from orchestrator.core.rpc_split import split_key

    (a,) = place_on_seed_machines(4096, split_factors={split_key(first.nodes): 0.3}).assignments
    assert a.kind == "split" and "not taken" in a.split_why


def test_a_running_split_stays_while_all_its_nodes_live_and_moves_when_a_helper_goes():
    (a,) = place_on_seed_machines(4096).assignments
    (kept,) = place_on_seed_machines(4096, current=[a]).assignments
    assert kept == a
    helper = a.helpers[0].node
    gone = [n for n in seed_machines() if n.name != helper]
    (moved,) = place_on_seed_machines(4096, gone, current=[a]).assignments
    assert helper not in moved.nodes
