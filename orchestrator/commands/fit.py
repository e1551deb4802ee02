"""`homefleet fit MODEL.gguf|CATALOG_NAME`: memory breakdown and where the model fits.

    homefleet fit qwen2.5-coder-32b                  # catalog entry, Q4_K_M
    homefleet fit llama-2-7b:q8_0 --ctx 8192 --flash-attn --kv-type q8_0
    homefleet fit ./model.gguf --nodes my-box.yaml --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestrator.core import catalog
from orchestrator.core.estimate import KV_TYPES, EstimateError, EstimateOptions
from orchestrator.core.gguf_file import GGUFError
from orchestrator.core.model_shape import ModelShape, shape_from_gguf
from orchestrator.fit import fit_report, fit_to_dict, render_fit
from orchestrator.machines import HardwareFileError, load_machines


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="memory breakdown of a model and where it fits (GPU, split, CPU) on each node",
        description="Estimate a model's memory (weights, KV cache, compute buffers, overhead) from its "
        "GGUF header or a catalog entry, and say for each node whether it fits whole on the GPU, "
        "split between GPU and CPU, on the CPU only, or not at all.",
    )
    p.add_argument("model", help=f"a .gguf file or a catalog name ({', '.join(catalog.names()[:3])}, ...; "
                                 "append :q8_0 etc. for another quantization)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens (0: the model's own)")
    p.add_argument("--nodes", metavar="FILE", nargs="+", help="hardware files (default: the reference machines)")
    p.add_argument("--kv-type", default="f16", choices=KV_TYPES, help="KV cache type (quantized needs --flash-attn)")
    p.add_argument("--flash-attn", action="store_true", help="flash attention on")
    p.add_argument("--batch", type=int, default=512, help="n_batch")
    p.add_argument("--ubatch", type=int, default=512, help="n_ubatch")
    p.add_argument("--speed-factor", metavar="NODE=F", action="append", default=[],
                   help="calibrate a node's predicted tokens/s by a measured factor (repeatable)")
    p.add_argument("--measure", action="store_true",
                   help="also fit this machine, its speed calibrated by a short measured run of MODEL.gguf")
    p.add_argument("--url", help="fit the nodes of a running cluster (their speed calibrated by served requests)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


class FitError(Exception):
    """Why no report can be made, in words fit for the terminal."""


def load_shape(model: str) -> tuple[ModelShape, str]:
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise FitError(f"{path}: no such file")
        try:
            return shape_from_gguf(path), str(path)
        except (GGUFError, OSError) as exc:
            raise FitError(str(exc)) from None
    shape = catalog.lookup(model)
    if shape is None:
        base, quant = catalog.parse_name(model)
        if base in catalog.names() or any(base == a for a in catalog._BY_NAME):
            raise FitError(f"no quantization {quant!r}; known: {', '.join(catalog.quant_names())}")
        raise FitError(f"{model!r} is neither a .gguf file nor a catalog model; known: {', '.join(catalog.names())}")
    return shape, "catalog"


def _speed_factors(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        node, sep, value = item.partition("=")
        try:
            out[node] = float(value)
        except ValueError:
            sep = ""
        if not sep or not node:
            raise FitError(f"--speed-factor wants NODE=FACTOR, got {item!r}")
    return out


def _live_nodes(url: str, factors: dict[str, float]) -> list:
    """Alive nodes of a running cluster, with the speed factors their replicas measured."""
    from orchestrator.cluster_view import ClusterView
    from orchestrator.commands.status import StatusError, fetch_cluster

    try:
        view = ClusterView.model_validate(fetch_cluster(url.rstrip("/"), os.environ.get("HOMEFLEET_API_KEY")))
    except StatusError as exc:
        raise FitError(str(exc)) from None
    nodes = []
    for node in view.nodes:
        if node.state != "alive":
            continue
        if node.speed_factor is not None:
            factors.setdefault(node.name, node.speed_factor)
        nodes.append(node.hardware)
    return nodes


def _measured_this_machine(model: str, shape: ModelShape, factors: dict[str, float]):
    """This machine as probed, its speed calibrated by decoding a few tokens of the model."""
    from orchestrator.fit import calibrate_speed
    from worker.probe import probe
    from worker.speed_probe import measure_decode_speed

    if not model.endswith(".gguf") or not os.path.isfile(model):
        raise FitError("--measure needs a GGUF file on this machine, not a catalog name")
    node = probe()
    node = node.model_copy(update={"name": f"{node.name} (measured)"})
    gpu = node.gpus[0] if node.gpus else None
    layers = shape.n_layers + 1 if gpu else 0
    result = measure_decode_speed(model, layers)
    if not result.get("decode_tokens_per_s"):
        raise FitError(result.get("error") or "the measured run produced no tokens")
    node, factor = calibrate_speed(node, shape, layers, gpu, result["decode_tokens_per_s"])
    factors[node.name] = factor
    print(f"measured on this machine: {result['decode_tokens_per_s']:.1f} tokens/s "
          f"({layers} layers on GPU)", file=sys.stderr)
    return node


def run(args: argparse.Namespace) -> int:
    try:
        shape, source = load_shape(args.model)
        opts = EstimateOptions(args.ctx, args.batch, args.ubatch, args.kv_type, args.flash_attn)
        factors = _speed_factors(args.speed_factor)
        nodes = _live_nodes(args.url, factors) if args.url else load_machines(args.nodes)
        if args.measure:
            nodes.append(_measured_this_machine(args.model, shape, factors))
        if not nodes:
            raise FitError("no hardware files: pass --nodes FILE... (see configs/machines/*.yaml)")
        report = fit_report(shape, opts, nodes, source, calibrations=factors)
    except (FitError, EstimateError, HardwareFileError) as exc:
        print(f"homefleet fit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(fit_to_dict(report), indent=2))
    else:
        print(render_fit(report))
    return 0 if any(n.verdict != "none" for n in report.nodes) else 1
