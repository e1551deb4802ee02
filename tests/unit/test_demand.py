"""Config models become one ModelDemand per replica; sizing problems are values, not crashes."""

from __future__ import annotations

import pytest

from orchestrator.config import ModelConfig
from orchestrator.core.hardware import GIB, MIB
from orchestrator.core.memory import MemoryNeed
from orchestrator.demand import DemandError, demands_for, resolve_model_path


def model(name: str, **kwargs) -> ModelConfig:
    return ModelConfig(name=name, path=f"/models/{name}.gguf", **kwargs)


def fake_shape_loader(config: ModelConfig) -> dict:
    if "missing" in config.name:
        raise FileNotFoundError(f"no such file: {config.path}")
    return {"layers": 33, "context": config.context}


def fake_need_builder(shape: dict, config: ModelConfig):
    """needs(s)(k): a GiB per layer where it lives, the context's bytes per slot in RAM."""
    made: dict[int, object] = {}

    def needs(n_slots: int):
        def need(k: int) -> MemoryNeed:
            return MemoryNeed(gpu_bytes=k * GIB, ram_bytes=(shape["layers"] - k) * GIB + n_slots * shape["context"])

        return made.setdefault(n_slots, need)

    return shape["layers"], needs


def test_one_demand_per_replica_carrying_the_models_overrides():
    configs = [
        model("a", replicas=2, node="laptop-1", gpu_layers=10, keep_free_vram_mib=512),
        model("b", context=8192),
        model("idle", replicas=0),
    ]
    demands = demands_for(configs, fake_shape_loader, fake_need_builder)
    assert [(d.model, d.replica) for d in demands] == [("a", 0), ("a", 1), ("b", 0)]
    a0 = demands[0]
    assert (a0.n_layers, a0.pin_node, a0.gpu_layers, a0.keep_free_vram_bytes) == (33, "laptop-1", 10, 512 * MIB)
    assert demands[2].need(0).ram_bytes == 33 * GIB + 8192  # the model's own context reached the estimate


def test_replicas_of_a_model_share_one_need_function():
    a0, a1, a2 = demands_for([model("a", replicas=3)], fake_shape_loader, fake_need_builder)
    assert a0.need is a1.need is a2.need


def test_model_that_cannot_be_sized_is_reported_and_the_others_still_get_demands():
    problems: dict[str, str] = {}
    demands = demands_for(
        [model("missing-7b"), model("ok")], fake_shape_loader, fake_need_builder, on_problem=problems.__setitem__
    )
    assert [d.model for d in demands] == ["ok"]
    assert problems == {"missing-7b": "cannot estimate its memory: no such file: /models/missing-7b.gguf"}


def test_model_that_cannot_be_sized_raises_a_named_error_without_a_sink():
    with pytest.raises(DemandError, match="^missing-7b: cannot estimate its memory"):
        demands_for([model("missing-7b")], fake_shape_loader, fake_need_builder)


@pytest.mark.parametrize(
    "path, models_dir, expected",
    [
        ("/abs/m.gguf", "/models", "/abs/m.gguf"),
        ("m.gguf", "/models", "/models/m.gguf"),
        ("m.gguf", None, "m.gguf"),
    ],
)
def test_relative_model_paths_are_under_models_dir(path, models_dir, expected):
    assert str(resolve_model_path(ModelConfig(name="m", path=path), models_dir)) == expected


# ---------------------------------------------------------------- slots


def test_a_model_without_parallel_lets_placement_pick_up_to_four_slots():
    (d,) = demands_for([model("a", context=1000)], fake_shape_loader, fake_need_builder)
    assert (d.slots, d.max_slots, d.picks_slots) == (1, 4, True)
    assert d.need is d.need_for_slots(1)
    assert d.need_for_slots(4)(0).ram_bytes == 33 * GIB + 4 * 1000  # every slot has the whole context


@pytest.mark.parametrize("parallel", [1, 2, 8])
def test_an_explicit_parallel_is_the_demands_slot_count_and_its_need(parallel):
    (d,) = demands_for([model("a", context=1000, parallel=parallel)], fake_shape_loader, fake_need_builder)
    assert (d.slots, d.need_for_slots, d.picks_slots) == (parallel, None, False)
    assert d.need(0).ram_bytes == 33 * GIB + parallel * 1000


def test_an_embedding_model_has_one_slot():
    (d,) = demands_for([model("e", embedding=True, context=1000)], fake_shape_loader, fake_need_builder)
    assert (d.slots, d.picks_slots, d.need(0).ram_bytes) == (1, False, 33 * GIB + 1000)


def test_the_real_estimate_counts_kv_for_every_slot():
    from orchestrator.core import catalog
    from orchestrator.demand import estimate_need

    shape = catalog.lookup("qwen2.5-coder-14b")
    n_layers, needs = estimate_need(shape, model("q", context=8192))
    kv_per_slot = 2 * 48 * 8 * 128 * 2 * 8192  # K and V, 48 layers, 8 KV heads of 128, f16
    whole = [needs(s)(n_layers) for s in (1, 2, 4)]
    assert whole[1].gpu_bytes - whole[0].gpu_bytes >= kv_per_slot
    assert whole[2].gpu_bytes - whole[1].gpu_bytes >= 2 * kv_per_slot
    assert whole[0].ram_bytes <= whole[2].ram_bytes <= whole[0].ram_bytes + 4 * 4 * shape.n_vocab  # logits rows


def test_planning_a_config_shows_the_slot_count_chosen():
    from orchestrator.commands.plan import make_plan, nodes_from_files
    from orchestrator.core import catalog
    from orchestrator.demand import estimate_need

    configs = [ModelConfig(name="tiny", catalog="gemma-3-270m"), ModelConfig(name="two", catalog="gemma-3-270m",
                                                                          parallel=2)]
    demands = demands_for(configs, lambda m: catalog.lookup(m.catalog), estimate_need)
    result = make_plan(nodes_from_files(None), demands)
    assert {(a.model, a.kind, a.parallel) for a in result.assignments} == {("tiny", "gpu", 4), ("two", "gpu", 2)}
