"""NodeAgent: a small Ray actor on every node. It reports the node's hardware, live use
and model store (files, hashes, free disk), serves its store's files to peers over an
authenticated HTTP server, and runs the transfers that bring files into its store.
The controller polls it every few seconds.

What the node is (its name, a declared hardware file, its models directory, the port of
its file server) comes from the environment of the node's raylet, which `homefleet
join`/`up` set; actors inherit it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import ray

from orchestrator.core.hardware import NodeHardware
from orchestrator.core.model_source import is_store_name
from orchestrator.core.store_types import TransferProgress
from worker.file_server import FileServer
from worker.mac_address import mac_of_address
from worker.paths import resolve_path
from worker.probe import NvmlSession, overlay_live_use, probe
from worker.rpc_servers import RpcServers
from worker.store import ModelStore, StoreError, default_models_dir
from worker.transfer import Transfer, TransferCancelled, TransferFailed, TransferSpec

log = logging.getLogger(__name__)

ENV_NODE_NAME = "HOMEFLEET_NODE_NAME"
ENV_HARDWARE_JSON = "HOMEFLEET_HARDWARE_JSON"
ENV_MODELS_DIR = "HOMEFLEET_MODELS_DIR"
ENV_STORE_PORT = "HOMEFLEET_STORE_PORT"
ENV_WAKE_MAC = "HOMEFLEET_WAKE_MAC"
FINISHED_TRANSFERS_KEPT = 32


def node_environment(
    name: str | None, hardware: NodeHardware | None, models_dir: str | None, store_port: int | None = None,
    wake_mac: str | None = None,
) -> dict[str, str]:
    """Environment for a raylet so that its agent knows what node it is."""
    env = {}
    if name:
        env[ENV_NODE_NAME] = name
    if hardware is not None:
        env[ENV_HARDWARE_JSON] = hardware.model_dump_json()
    if models_dir:
        env[ENV_MODELS_DIR] = str(Path(models_dir).expanduser().resolve())
    if store_port:
        env[ENV_STORE_PORT] = str(store_port)
    if wake_mac:
        env[ENV_WAKE_MAC] = wake_mac
    return env


def resolve_model_path(path: str, models_dir: str | None) -> str:
    return str(resolve_path(path, models_dir))


class NodeAgentImpl:
    def __init__(self) -> None:
        declared = os.environ.get(ENV_HARDWARE_JSON)
        self.declared = NodeHardware.model_validate_json(declared) if declared else None
        self.name = os.environ.get(ENV_NODE_NAME) or (self.declared.name if self.declared else socket.gethostname())
        self.models_dir = os.environ.get(ENV_MODELS_DIR) or str(default_models_dir())
        self.nvml = NvmlSession()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.address = ray.util.get_node_ip_address()
        self.mac = os.environ.get(ENV_WAKE_MAC) or mac_of_address(self.address)  # for Wake-on-LAN
        declared_disk = self.declared.disk_free_bytes if self.declared else None
        self.store = ModelStore(self.models_dir, None if declared_disk is None else int(declared_disk))
        # Peers fetch files with this key, which only the head (over Ray's authenticated channel) hands out.
        self.store_key = secrets.token_urlsafe(32)
        self._exports: dict[str, str] = {}  # name -> configured path outside the store, servable too
        self.file_server = FileServer(self.address, int(os.environ.get(ENV_STORE_PORT, "0")), self._resolve_served,
                                      self.store_key).start()
        self._transfers: dict[str, Transfer] = {}
        self._finished: dict[str, TransferProgress] = {}
        self._lock = threading.Lock()
        self.rpc_servers = RpcServers(self.address)  # splits across machines that use this node's GPU
        probe(self.name, self.nvml)  # primes psutil's CPU percentage

    # ---- reports ---------------------------------------------------------------------
    def report(self, model_paths: dict[str, str]) -> dict:
        """Hardware now, the store, the transfers, and where each configured {model: path} resolves here."""
        measured = probe(self.name, self.nvml)
        hardware = overlay_live_use(self.declared, measured) if self.declared else measured
        hardware = hardware.model_copy(update={"name": self.name})
        configured = {}
        for model, path in model_paths.items():
            resolved = resolve_model_path(path, self.models_dir)
            if os.path.isfile(resolved):
                configured[model] = resolved
        self._exports = {Path(p).name: p for p in configured.values() if not self.store.contains(p)}
        store = self.store.report(list(configured.values()), server_url=self.file_server.url)
        return {
            "name": self.name,
            "node_id": self.node_id,
            "address": self.address,
            "hardware": json.loads(hardware.model_dump_json()),
            "model_files": configured,
            "store": store.model_dump(mode="json"),
            "store_key": self.store_key,
            "mac": self.mac,
            "transfers": [p.model_dump(mode="json") for p in self.transfers()],
            "rpc_servers": self.rpc_servers.listing(),
            "reported_at": time.time(),
        }

    def _resolve_served(self, name: str) -> Path:
        """Files peers may fetch: the store's, and configured model files kept elsewhere on this node."""
        try:
            return self.store.path_of(name)
        except StoreError:
            exported = self._exports.get(name) if is_store_name(name) else None
            if exported is None:
                raise
            return Path(exported)

    # ---- transfers into this store ---------------------------------------------------------
    def start_transfer(self, spec: dict) -> dict:
        """Start fetching a file into this store (a thread); progress comes with each report."""
        parsed = TransferSpec.from_dict(spec)
        with self._lock:
            running = self._transfers.get(parsed.transfer_id)
            if running is not None:
                return running.progress().model_dump(mode="json")
            try:
                transfer = Transfer(self.store, parsed)
            except TransferFailed as exc:
                progress = TransferProgress(transfer_id=parsed.transfer_id, name=parsed.name, state="failed",
                                            error=str(exc))
                self._finish(progress)
                return progress.model_dump(mode="json")
            self._transfers[parsed.transfer_id] = transfer
        threading.Thread(target=self._run_transfer, args=(transfer,), name=f"transfer-{parsed.name}",
                         daemon=True).start()
        return transfer.progress().model_dump(mode="json")

    def _run_transfer(self, transfer: Transfer) -> None:
        try:
            transfer.run()
        except (TransferFailed, TransferCancelled) as exc:
            log.warning("transfer of %s: %s", transfer.spec.name, exc or type(exc).__name__)
        except Exception as exc:  # a bug must not leave the transfer "copying" for ever
            log.exception("transfer of %s crashed", transfer.spec.name)
            transfer._progress = transfer.progress().model_copy(update={"state": "failed", "error": repr(exc)})
        with self._lock:
            self._transfers.pop(transfer.spec.transfer_id, None)
            self._finish(transfer.progress())

    def _finish(self, progress: TransferProgress) -> None:
        self._finished[progress.transfer_id] = progress
        while len(self._finished) > FINISHED_TRANSFERS_KEPT:
            self._finished.pop(next(iter(self._finished)))

    def transfers(self) -> list[TransferProgress]:
        with self._lock:
            running = [t.progress() for t in self._transfers.values()]
            return running + list(self._finished.values())

    def transfer(self, transfer_id: str) -> dict | None:
        for progress in self.transfers():
            if progress.transfer_id == transfer_id:
                return progress.model_dump(mode="json")
        return None

    def cancel_transfer(self, transfer_id: str) -> bool:
        with self._lock:
            transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return False
        transfer.cancel()
        return True

    def remove_copy(self, name: str) -> dict:
        """`homefleet models prune`: delete a file homefleet copied here (never a user's own file)."""
        try:
            return {"name": name, "freed_bytes": self.store.remove_copy(name)}
        except StoreError as exc:
            return {"name": name, "error": str(exc)}

    # ---- model files ---------------------------------------------------------------------
    def read_shape(self, path: str):
        """The model's shape from its GGUF header, read on the node that holds the file."""
        from orchestrator.core.model_shape import shape_from_gguf

        return shape_from_gguf(resolve_model_path(path, self.models_dir))

    def dry_run(self, path: str, n_ctx: int, n_gpu_layers: int, kv_type: str, flash_attn: bool | None,
                n_slots: int = 1) -> dict:
        """llama.cpp's own figure for this model here (a child process; no memory is allocated),
        for the batched engine's context: `n_slots` slots of `n_ctx` each; flash_attn None: auto."""
        from dataclasses import asdict

        try:
            from worker.dry_run import dry_run
        except ImportError as exc:
            return {"error": f"no llama-cpp-python on {self.name}: {exc}"}
        result = dry_run(resolve_model_path(path, self.models_dir), n_ctx, n_gpu_layers, kv_type=kv_type,
                         flash_attn=flash_attn, n_slots=n_slots)
        return asdict(result)

    # ---- llama.cpp RPC servers: this node's GPU in a split across machines (issue 13) ---------
    def start_rpc_server(self, port: int, gpu_index: int | None) -> dict:
        """Serve the GPU placement chose at this node's cluster address and `port`. A declared
        machine's GPU that this host does not have is served by its CPU, as a replica placed
        on it runs on the CPU (tests, plans on one host)."""
        if gpu_index is not None and not self.nvml.available and self.declared is not None:
            gpu_index = None
        return self.rpc_servers.start(port, gpu_index)

    def stop_rpc_server(self, port: int) -> bool:
        return self.rpc_servers.stop(port)

    def has_gpu(self) -> bool:
        return self.nvml.available


def agent_actor_class():
    # Reports go on while dry runs and transfer starts are in flight.
    return ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1)(NodeAgentImpl)
