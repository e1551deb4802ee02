"""`homefleet plan`: dry-run placement of a config's models, with per-node reasons.

Nodes come from hardware files (`--nodes FILE...`, default: the reference machines) or,
with `--url`, from the live nodes of a running gateway (`GET /api/cluster`), whose running
replicas are kept where they are. Models come from `--config`. Nothing is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from orchestrator.cluster_view import ClusterView
from orchestrator.commands.status import StatusError, fetch_cluster
from orchestrator.config import ConfigError, HomefleetConfig, load_config
from orchestrator.core.hardware import NodeHardware
from orchestrator.core.model_shape import ModelShape
from orchestrator.core.placement import (
    Assignment,
    GpuPart,
    ModelDemand,
    NodeSnapshot,
    PlacementResult,
    place,
    Splitter,
    reservations_for,
    snapshot_from_hardware,
)
from orchestrator.demand import default_shape_loader, demands_for, estimate_options
from orchestrator.split_planner import make_splitter
from orchestrator.machines import HardwareFileError, default_machine_files, load_hardware_file
from orchestrator.plan_report import plan_to_dict, render_plan

LIVE_STATES = ("ready", "loading")


class PlanError(Exception):
    """Why no plan can be made, in words fit for the terminal."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="dry-run placement: which node and GPU each model would get, and why not",
        description="Place the models of a config onto nodes without starting anything. Nodes come "
        "from hardware files (default: the three reference machines) or from a running gateway (--url).",
    )
    parser.add_argument("--config", metavar="FILE", default=None, help="homefleet config whose models to place")
    parser.add_argument(
        "--nodes",
        metavar="FILE",
        nargs="+",
        default=None,
        help="hardware files (YAML/JSON, the probe's schema) to plan on (default: the reference machines)",
    )
    parser.add_argument("--url", default=None, help="plan on the live nodes of the gateway at this URL instead")
    parser.add_argument("--api-key", default=None, help="API key for --url (default: $HOMEFLEET_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.url and args.nodes:
            raise PlanError("give either --nodes or --url, not both")
        config = load_config(args.config) if args.config else HomefleetConfig()
        if args.url:
            nodes, current, loading, hardware = nodes_from_gateway(args.url, args.api_key)
        else:
            hardware = hardware_from_files(args.nodes)
            nodes, current, loading = [snapshot_from_hardware(h) for h in hardware], [], []
        demands, problems, shapes = _demands(config)
    except (PlanError, ConfigError) as exc:
        print(f"homefleet plan: {exc}", file=sys.stderr)
        return 1
    result = make_plan(nodes, demands, current, loading, splitter_for(config, hardware, shapes))
    if args.json:
        print(json.dumps(plan_to_dict(result, nodes, problems), indent=2))
    else:
        sys.stdout.write(render_plan(result, nodes, problems))
    return 0


def make_plan(
    nodes: Sequence[NodeSnapshot],
    demands: Sequence[ModelDemand],
    current: Sequence[Assignment] = (),
    loading: Sequence[Assignment] = (),
    splitter: Splitter | None = None,
) -> PlacementResult:
    """Running replicas stay; loading ones also hold memory their node does not show yet."""
    return place(nodes, demands, current=[*current, *loading], reserved=reservations_for(loading), splitter=splitter)


def splitter_for(config: HomefleetConfig, hardware: Sequence[NodeHardware],
                 shapes: Mapping[str, ModelShape]) -> Splitter | None:
    """Splits across machines weighed as the running head weighs them (orchestrator/split_planner.py),
    for the models whose `shapes` are known."""
    if not config.cluster.rpc_split:
        return None
    models = {m.name: m for m in config.models}
    return make_splitter(shapes, lambda name, slots: estimate_options(models[name], slots),
                         {h.name: h for h in hardware})


# ----------------------------------------------------------------------------- nodes


def nodes_from_files(paths: Sequence[str] | None) -> list[NodeSnapshot]:
    """Snapshots of hardware files; every model file counts as present (model_files=None)."""
    return [snapshot_from_hardware(h) for h in hardware_from_files(paths)]


def hardware_from_files(paths: Sequence[str] | None) -> list[NodeHardware]:
    files = [Path(p) for p in paths] if paths else default_machine_files()
    if not files:
        raise PlanError("no hardware files: pass --nodes FILE... (see configs/machines/*.yaml)")
    return [_load_hardware(path) for path in files]


def nodes_from_gateway(
    url: str, api_key: str | None
) -> tuple[list[NodeSnapshot], list[Assignment], list[Assignment], list[NodeHardware]]:
    """Live nodes of a gateway, its running (ready) and loading replicas, and their hardware."""
    url = url.rstrip("/")
    try:
        view = ClusterView.model_validate(fetch_cluster(url, api_key or os.environ.get("HOMEFLEET_API_KEY")))
    except StatusError as exc:
        raise PlanError(str(exc)) from None
    except ValidationError as exc:
        raise PlanError(f"{url}/api/cluster did not answer with a cluster view: {exc}") from None
    return (*snapshots_from_view(view), [n.hardware for n in view.nodes if n.hardware is not None])


def snapshots_from_view(view: ClusterView) -> tuple[list[NodeSnapshot], list[Assignment], list[Assignment]]:
    nodes = [
        replace(snapshot_from_hardware(n.hardware, model_files=n.model_files), alive=n.state == "alive")
        for n in view.nodes
    ]
    ready: list[Assignment] = []
    loading: list[Assignment] = []
    for model in view.models:
        for number, replica in enumerate(model.replicas):
            if replica.node is None or replica.state not in LIVE_STATES:
                continue
            kind = "cpu" if replica.gpu_layers <= 0 else ("gpu" if replica.gpu_layers >= replica.total_layers else "split")
            kind = "rpc" if replica.helpers else kind
            assignment = Assignment(
                model=model.name,
                replica=number,
                node=replica.node,
                gpu_index=replica.gpu_index,
                gpu_layers=replica.gpu_layers,
                n_layers=replica.total_layers,
                gpu_bytes=replica.measured_gpu_bytes or replica.estimated_gpu_bytes or 0,
                ram_bytes=replica.measured_ram_bytes or replica.estimated_ram_bytes or 0,
                kind=kind,
                parallel=getattr(replica, "slots", 1) or 1,  # the slots it runs with
                helpers=tuple(GpuPart(h.node, h.gpu_index, h.layers, h.gpu_bytes) for h in replica.helpers),
            )
            (ready if replica.state == "ready" else loading).append(assignment)
    return nodes, ready, loading


def _load_hardware(path: Path) -> NodeHardware:
    try:
        return load_hardware_file(path)
    except HardwareFileError as exc:
        raise PlanError(str(exc)) from None


# ----------------------------------------------------------------------------- models


def _demands(config: HomefleetConfig) -> tuple[list[ModelDemand], dict[str, str], dict[str, ModelShape]]:
    """ModelDemands of the config, and the shapes they were sized from (each GGUF header read
    once); a model whose size cannot be known becomes a problem line."""
    if not config.models:
        return [], {}, {}
    problems: dict[str, str] = {}
    shapes: dict[str, ModelShape] = {}

    def load_shape(model):
        shapes[model.name] = default_shape_loader(model, models_dir=config.cluster.models_dir)
        return shapes[model.name]

    demands = demands_for(config.models, load_shape, on_problem=problems.__setitem__)
    return demands, problems, shapes
