"""`GET /api/plan`: where a model would fit on the live cluster, and why, for the dashboard's
plan view. Read-only: nothing is loaded, copied or reserved.

It says what `homefleet fit MODEL --url` and `homefleet plan --url` say against the same
cluster: the fit of each alive node (its hardware as last reported, its measured speed
factor) and where placement would put one replica now, beside the replicas that run or
load. The model is a catalog name (`qwen2.5-coder-7b`, `llama-2-7b:q8_0`) or the name of a
GGUF file a node's store holds (`node` picks the holder; its header is read there).
`GET /api/plan/choices` lists what can be picked.

Bad input is a 400 naming the query parameter; so is a parameter this endpoint does not read.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from orchestrator.cluster_view import ClusterView
from orchestrator.commands.plan import make_plan, snapshots_from_view
from orchestrator.core import catalog
from orchestrator.core.estimate import KV_TYPES, EstimateError, EstimateOptions, slot_needs
from orchestrator.core.hardware import NodeHardware
from orchestrator.core.model_shape import ModelShape
from orchestrator.core.placement import DEFAULT_MAX_SLOTS, ModelDemand
from orchestrator.fit import fit_report, fit_to_dict, render_fit
from orchestrator.split_planner import make_splitter
from orchestrator.gateway.openapi import error_responses
from orchestrator.plan_report import assignment_dict, render_plan
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller

DEFAULT_CTX = 4096  # as `homefleet fit`
MAX_CTX = 1 << 20
PARAMETERS = ("model", "node", "ctx", "kv_type", "flash_attn")
TRUE_TEXTS, FALSE_TEXTS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class PlanQuery:
    model: str
    node: str | None
    options: EstimateOptions


class PlanPlacement(BaseModel):
    placed: bool
    summary: str = Field(..., description="One line: where the replica would run, or why it runs nowhere.")
    assignment: dict[str, Any] | None = Field(None, description="node, gpu_index, gpu_layers, n_layers, gpu_bytes, "
                                                                 "ram_bytes, kind, parallel (as `homefleet plan --json`).")
    reasons: dict[str, str] = Field(default_factory=dict, description="Node -> why not there, when not placed.")


class PlanAnswer(BaseModel):
    model: str
    source: str = Field(..., description="`catalog`, or `NODE:PATH` of the GGUF file whose header was read.")
    n_ctx: int = Field(..., description="Context per slot the figures are for.")
    kv_type: str
    flash_attn: bool
    fit: dict[str, Any] = Field(..., description="`homefleet fit --json` against the alive nodes: the memory "
                                                  "breakdown and, per node, verdict (gpu, split, cpu, none), "
                                                  "summary and predicted tokens_per_s.")
    fit_text: str = Field(..., description="What `homefleet fit MODEL --url` prints.")
    placement: PlanPlacement
    plan_text: str = Field(..., description="What `homefleet plan --url` prints for a config of this one model.")


class PlanFile(BaseModel):
    name: str
    node: str
    size_bytes: int


class PlanChoices(BaseModel):
    catalog: list[str] = Field(..., description="Catalog models (append :q8_0 etc. for another quantization).")
    quants: list[str]
    files: list[PlanFile] = Field(..., description="GGUF files the alive nodes' stores hold.")
    kv_types: list[str]
    default_ctx: int = DEFAULT_CTX


# ----------------------------------------------------------------------------- pure parts


def parse_plan_query(items: Iterable[tuple[str, str]]) -> PlanQuery:
    """The query string's (name, value) pairs as a PlanQuery; RequestError (400, `param`
    named) on bad input: an unknown or repeated parameter too."""
    params: dict[str, str] = {}
    for name, value in items:
        if name not in PARAMETERS:
            raise RequestError(f"Unrecognized query parameter: '{name}'; this endpoint reads "
                               f"{', '.join(PARAMETERS)}.", param=name, code="unknown_parameter")
        if name in params:
            raise RequestError(f"Invalid value for '{name}': given more than once.", param=name, code="invalid_value")
        params[name] = value
    model = (params.get("model") or "").strip()
    if not model:
        raise RequestError("Missing required parameter: 'model' (a catalog name or a GGUF file a node holds).",
                           param="model", code="missing_required_parameter")
    ctx_text = params.get("ctx", str(DEFAULT_CTX)).strip() or str(DEFAULT_CTX)
    if not re.fullmatch(r"[0-9]+", ctx_text):
        raise RequestError(f"Invalid value for 'ctx': {ctx_text!r} is not a whole number of tokens.",
                           param="ctx", code="invalid_value")
    ctx = int(ctx_text)
    if not 0 <= ctx <= MAX_CTX:
        raise RequestError(f"Invalid value for 'ctx': {ctx} is not between 0 (the model's own) and {MAX_CTX}.",
                           param="ctx", code="invalid_value")
    kv_type = params.get("kv_type", "f16").strip().lower() or "f16"
    if kv_type not in KV_TYPES:
        raise RequestError(f"Invalid value for 'kv_type': {kv_type!r}; one of {', '.join(KV_TYPES)}.",
                           param="kv_type", code="invalid_value")
    flash_text = params.get("flash_attn", "false").strip().lower()
    if flash_text not in TRUE_TEXTS + FALSE_TEXTS:
        raise RequestError(f"Invalid value for 'flash_attn': {flash_text!r} is not true or false.",
                           param="flash_attn", code="invalid_value")
    try:
        options = EstimateOptions(n_ctx=ctx, kv_type=kv_type, flash_attn=flash_text in TRUE_TEXTS)
    except EstimateError as exc:
        raise RequestError(f"Invalid value for 'kv_type': {exc}.", param="kv_type", code="invalid_value") from None
    node = (params.get("node") or "").strip() or None
    return PlanQuery(model, node, options)


def fit_nodes(view: ClusterView) -> tuple[list[NodeHardware], dict[str, float]]:
    """Alive nodes and their measured speed factors: what `homefleet fit --url` fits on."""
    alive = [n for n in view.nodes if n.state == "alive"]
    return [n.hardware for n in alive], {n.name: n.speed_factor for n in alive if n.speed_factor is not None}


def files_held(view: ClusterView) -> list[PlanFile]:
    """GGUF files of alive nodes' stores, by name then node."""
    out = [PlanFile(name=f.name, node=n.name, size_bytes=f.size_bytes)
           for n in view.nodes if n.state == "alive" and n.store is not None for f in n.store.files]
    return sorted(out, key=lambda f: (f.name, f.node))


def file_on(view: ClusterView, name: str, node: str | None) -> tuple[str, str] | None:
    """(node, path) of file `name` on `node` (any alive holder when None); None if none holds it."""
    for n in view.nodes:
        if n.state != "alive" or n.store is None or (node is not None and n.name != node):
            continue
        for f in n.store.files:
            if f.name == name:
                return n.name, f.path
    return None


def plan_answer(view: ClusterView, shape: ModelShape, source: str, query: PlanQuery) -> PlanAnswer:
    """Fit on every alive node and one replica's placement, both against `view`."""
    hardware, factors = fit_nodes(view)
    report = fit_report(shape, query.options, hardware, source, calibrations=factors)
    nodes, ready, loading = snapshots_from_view(view)
    # The planned model's own running replicas are already in the nodes' free figures: leave
    # them out, or placement would keep "it" where they run.
    ready = [a for a in ready if a.model != query.model]
    loading = [a for a in loading if a.model != query.model]
    needs = slot_needs(shape, query.options)
    demand = ModelDemand(model=query.model, replica=0, n_layers=shape.n_layers + 1, need=needs(1), slots=1,
                         need_for_slots=needs, max_slots=DEFAULT_MAX_SLOTS)
    splitter = make_splitter({query.model: shape}, lambda _, slots: replace(query.options, n_slots=slots),
                             {h.name: h for h in hardware}, factors)
    result = make_plan(nodes, [demand], ready, loading, splitter)
    return PlanAnswer(
        model=query.model, source=source, n_ctx=report.whole_gpu.n_ctx, kv_type=query.options.kv_type,
        flash_attn=query.options.flash_attn, fit=fit_to_dict(report), fit_text=render_fit(report),
        placement=_placement(result), plan_text=render_plan(result, nodes),
    )


def _placement(result) -> PlanPlacement:
    if result.assignments:
        a = result.assignments[0]
        where = a.node if a.gpu_index is None else f"{a.node} GPU {a.gpu_index}"
        layers = {"gpu": "whole on the GPU", "split": f"{a.gpu_layers} of {a.n_layers} layers on the GPU",
                  "rpc": f"across machines: {a.describe()}", "cpu": "on the CPU only"}[a.kind]
        slots = f"{a.parallel} slot" + ("" if a.parallel == 1 else "s")
        return PlanPlacement(placed=True, summary=f"would run on {where}, {layers}, {slots}",
                             assignment=assignment_dict(a))
    unplaced = result.unplaced[0] if result.unplaced else None
    reasons = dict(unplaced.reasons) if unplaced else {}
    summary = "fits on no node now" if reasons else "no alive node to plan on"
    return PlanPlacement(placed=False, summary=summary, reasons=reasons)


# ----------------------------------------------------------------------------- routes


def plan_routes(controller: Controller) -> APIRouter:
    api = APIRouter()

    @api.get("/api/plan/choices", tags=["cluster"], response_model=PlanChoices, responses=error_responses(401))
    async def plan_choices():
        """What the plan view can pick: catalog models and the GGUF files the nodes hold."""
        choices = PlanChoices(catalog=catalog.names(), quants=catalog.quant_names(), files=files_held(controller.view()),
                              kv_types=list(KV_TYPES))
        return JSONResponse(choices.model_dump(mode="json"))

    @api.get("/api/plan", tags=["cluster"], response_model=PlanAnswer, responses=error_responses(400, 401))
    async def plan(
        request: Request,
        # Optional to FastAPI so that parse_plan_query, not the validator, names a missing one ("model").
        model: str | None = Query(None, description="Required: a catalog name (`qwen2.5-coder-7b`, `llama-2-7b:q8_0`) or the "
                                            "name of a GGUF file a node holds."),
        node: str | None = Query(None, description="The node whose copy of the file to read (default: any holder)."),
        ctx: str | None = Query(None, description=f"Context per slot in tokens (default {DEFAULT_CTX}; 0: the "
                                                  "model's own)."),
        kv_type: str | None = Query(None, description=f"KV cache type: {', '.join(KV_TYPES)} (default f16; "
                                                      "quantized needs flash_attn)."),
        flash_attn: str | None = Query(None, description="true or false (default false)."),
    ):
        """Where a model would fit on the live nodes and why: `homefleet fit` and `plan` against this cluster."""
        query = parse_plan_query(request.query_params.multi_items())
        view = controller.view()
        shape, source = await _shape(controller, view, query)
        return JSONResponse(plan_answer(view, shape, source, query).model_dump(mode="json"))

    return api


async def _shape(controller: Controller, view: ClusterView, query: PlanQuery) -> tuple[ModelShape, str]:
    """The model's shape: a catalog entry, else the header of the file on a node that holds it."""
    if query.node is None:
        shape = catalog.lookup(query.model)
        if shape is not None:
            return shape, "catalog"
    elif query.node not in {n.name for n in view.nodes if n.state == "alive"}:
        raise RequestError(f"Invalid value for 'node': no alive node named {query.node!r}.", param="node",
                           code="invalid_value")
    held = file_on(view, query.model, query.node)
    if held is None:
        where = f"a file on {query.node}" if query.node else "a catalog model or a file a node holds"
        known = ", ".join(catalog.names()[:4])
        raise RequestError(f"Invalid value for 'model': {query.model!r} is not {where} (catalog: {known}, ...; "
                           "GET /api/plan/choices lists them all).", param="model", code="invalid_value")
    node_name, path = held
    try:
        return await _read_shape(controller, node_name, path), f"{node_name}:{path}"
    except Exception as exc:  # a file that is not a readable GGUF, a node that stopped answering
        raise RequestError(f"Invalid value for 'model': cannot read the GGUF header of {path} on {node_name}: "
                           f"{exc}", param="model", code="invalid_value") from None


async def _read_shape(controller: Controller, node_name: str, path: str) -> ModelShape:
    """Read here when the file is here (as the controller does), else on its node."""
    from orchestrator.core.model_shape import shape_from_gguf

    if os.path.isfile(path):
        return await asyncio.to_thread(shape_from_gguf, path)
    record = next((r for r in controller.nodes.values() if r.name == node_name and r.alive), None)
    if record is None or record.agent is None:
        raise LookupError(f"{node_name} is not reachable")
    return await controller.cluster.read_shape(record.agent, path)
