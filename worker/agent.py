"""NodeAgent: a small Ray actor on every node that reports the node's hardware, live use
and which configured model files it holds. The controller polls it every few seconds.

What the node is (its name, a declared hardware file, its models directory) comes from the
environment of the node's raylet, which `homefleet join`/`up` set; actors inherit it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import ray

from orchestrator.core.hardware import NodeHardware
from orchestrator.demand import resolve_path
from worker.probe import NvmlSession, overlay_live_use, probe

ENV_NODE_NAME = "HOMEFLEET_NODE_NAME"
ENV_HARDWARE_JSON = "HOMEFLEET_HARDWARE_JSON"
ENV_MODELS_DIR = "HOMEFLEET_MODELS_DIR"


def node_environment(name: str | None, hardware: NodeHardware | None, models_dir: str | None) -> dict[str, str]:
    """Environment for a raylet so that its agent knows what node it is."""
    env = {}
    if name:
        env[ENV_NODE_NAME] = name
    if hardware is not None:
        env[ENV_HARDWARE_JSON] = hardware.model_dump_json()
    if models_dir:
        env[ENV_MODELS_DIR] = str(Path(models_dir).expanduser().resolve())
    return env


def resolve_model_path(path: str, models_dir: str | None) -> str:
    return str(resolve_path(path, models_dir))


class NodeAgentImpl:
    def __init__(self) -> None:
        declared = os.environ.get(ENV_HARDWARE_JSON)
        self.declared = NodeHardware.model_validate_json(declared) if declared else None
        self.name = os.environ.get(ENV_NODE_NAME) or (self.declared.name if self.declared else socket.gethostname())
        self.models_dir = os.environ.get(ENV_MODELS_DIR)
        self.nvml = NvmlSession()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.address = ray.util.get_node_ip_address()
        probe(self.name, self.nvml)  # primes psutil's CPU percentage

    def report(self, model_paths: dict[str, str]) -> dict:
        """Hardware now, and which of {model: path} exist on this node (path as resolved here)."""
        measured = probe(self.name, self.nvml)
        hardware = overlay_live_use(self.declared, measured) if self.declared else measured
        hardware = hardware.model_copy(update={"name": self.name})
        files = {}
        for model, path in model_paths.items():
            resolved = resolve_model_path(path, self.models_dir)
            if os.path.isfile(resolved):
                files[model] = resolved
        return {
            "name": self.name,
            "node_id": self.node_id,
            "address": self.address,
            "hardware": json.loads(hardware.model_dump_json()),
            "model_files": files,
            "reported_at": time.time(),
        }

    def read_shape(self, path: str):
        """The model's shape from its GGUF header, read on the node that holds the file."""
        from orchestrator.core.model_shape import shape_from_gguf

        return shape_from_gguf(resolve_model_path(path, self.models_dir))


    def dry_run(self, path: str, n_ctx: int, n_gpu_layers: int, kv_type: str, flash_attn: bool) -> dict:
        """llama.cpp's own figure for this model here (a child process; no memory is allocated)."""
        from dataclasses import asdict

        try:
            from worker.dry_run import dry_run
        except ImportError as exc:
            return {"error": f"no llama-cpp-python on {self.name}: {exc}"}
        result = dry_run(resolve_model_path(path, self.models_dir), n_ctx, n_gpu_layers, kv_type=kv_type,
                         flash_attn=flash_attn)
        return asdict(result)

    def has_gpu(self) -> bool:
        return self.nvml.available


def agent_actor_class():
    return ray.remote(num_cpus=0, max_concurrency=4, max_restarts=-1)(NodeAgentImpl)  # reports during dry runs
