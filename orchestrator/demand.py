"""From the config's models to what placement takes: one ModelDemand per replica.

The shape of a model (layers, tensor bytes, attention layout) comes from its GGUF header
when the file is on this machine, else from the catalog; the memory estimate turns a shape
and a context length into needs(s)(k): memory with k layers on the GPU and s slots (requests
served at once, each with the full context). Both are passed in, so tests use fakes and
the controller can read shapes on the nodes that hold the files.

Slots: a model that sets `parallel` gets a demand of exactly that many; one that leaves it
unset lets placement pick, as many as its node can hold up to DEFAULT_MAX_SLOTS (4)
(orchestrator/core/placement.py, "Slots"). An embedding model runs llama-cpp-python's
`Llama` (one request at a time): one slot, sized as that context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.config import ModelConfig
from orchestrator.core import catalog
from orchestrator.core.estimate import EstimateOptions, need_function, slot_needs
from orchestrator.core.hardware import MIB
from orchestrator.core.model_shape import ModelShape, shape_from_gguf
from orchestrator.core.placement import DEFAULT_MAX_SLOTS, ModelDemand, SlotNeeds
from worker.paths import resolve_path

ShapeLoader = Callable[[ModelConfig], ModelShape]
# (shape, model) -> (offloadable layers: blocks + output layer, needs: slots -> need(k) for k in 0..layers)
NeedBuilder = Callable[[ModelShape, ModelConfig], tuple[int, SlotNeeds]]
ProblemSink = Callable[[str, str], None]

# What a loader or the estimate raises for a model it cannot size (GGUFError and
# EstimateError are ValueErrors).
SIZING_ERRORS = (OSError, ValueError, LookupError)


class DemandError(ValueError):
    """A configured model whose memory need cannot be known; the message names it."""


def demands_for(
    config_models: Sequence[ModelConfig],
    shape_loader: ShapeLoader,
    need_builder: NeedBuilder | None = None,
    on_problem: ProblemSink | None = None,
) -> list[ModelDemand]:
    """One demand per replica, in config order (model, then replica 0..replicas-1).

    A model that cannot be sized raises DemandError, or, with `on_problem`, is reported
    there as (model name, why) and left out, so the other models still get placed.
    """
    build = need_builder or estimate_need
    demands: list[ModelDemand] = []
    for model in config_models:
        if model.replicas == 0:
            continue
        slots = fixed_slots(model)
        try:
            n_layers, needs = build(shape_loader(model), model)
            need = needs(slots or 1)
        except SIZING_ERRORS as exc:
            message = f"cannot estimate its memory: {exc}"
            if on_problem is None:
                raise DemandError(f"{model.name}: {message}") from exc
            on_problem(model.name, message)
            continue
        demands += [  # replicas share one need function (the estimate caches need(k))
            ModelDemand(
                model=model.name,
                replica=replica,
                n_layers=n_layers,
                need=need,
                pin_node=model.node,
                gpu_layers=model.gpu_layers,
                keep_free_vram_bytes=model.keep_free_vram_mib * MIB,
                slots=slots or 1,
                need_for_slots=None if slots else needs,
                max_slots=DEFAULT_MAX_SLOTS,
            )
            for replica in range(model.replicas)
        ]
    return demands


def fixed_slots(model: ModelConfig) -> int | None:
    """The slot count the config fixes (`parallel`; 1 for an embedding model), else None."""
    return 1 if model.embedding else model.parallel


def estimate_options(model: ModelConfig, n_slots: int = 1) -> EstimateOptions:
    """The estimate's options for a model's context settings, at `n_slots` slots."""
    return EstimateOptions(n_ctx=model.context, kv_type=model.kv_type, flash_attn=bool(model.flash_attn),
                           n_slots=n_slots)


def estimate_need(shape: ModelShape, model: ModelConfig) -> tuple[int, SlotNeeds]:
    """The analytic estimate (orchestrator/core/estimate.py) with the model's context settings:
    the batched engine's context per slot count, or `Llama`'s for an embedding model."""
    opts = estimate_options(model)
    if model.embedding:  # llama-cpp-python's defaults: full sliding-window cache, a ubatch of logits
        need = need_function(shape, EstimateOptions(n_ctx=model.context, kv_type=model.kv_type,
                                                    flash_attn=bool(model.flash_attn), swa_full=True, n_outputs_max=0))
        return offloadable_layers(shape), lambda n_slots: need
    return offloadable_layers(shape), slot_needs(shape, opts)


def offloadable_layers(shape: ModelShape) -> int:
    """Blocks + the output layer: what n_gpu_layers counts in llama.cpp."""
    return shape.n_layers + 1


def default_shape_loader(model: ModelConfig, models_dir: str | Path | None = None) -> ModelShape:
    """The GGUF header when the file is here; else the catalog entry (`catalog`, then the name)."""
    path = resolve_model_path(model, models_dir)
    if path is not None and path.is_file():
        return shape_from_gguf(path, name=model.name)
    for name in (model.catalog, model.name):
        shape = catalog.lookup(name) if name else None
        if shape is not None:
            return shape
    where = f"{path} is not on this machine" if path is not None else "no `path`"
    raise LookupError(f"{where} and no catalog entry named {model.catalog or model.name!r}")


def resolve_model_path(model: ModelConfig, models_dir: str | Path | None = None) -> Path | None:
    return resolve_path(model.path, models_dir) if model.path else None


