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
    def need(k: int) -> MemoryNeed:
        return MemoryNeed(gpu_bytes=k * GIB, ram_bytes=(shape["layers"] - k) * GIB + shape["context"])

    return shape["layers"], need


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
