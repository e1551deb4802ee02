"""The controller's hands on Ray: list nodes, start agents and replicas on a given node,
call them with timeouts, kill them. Everything Ray-specific the controller needs is here."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.drain_channel import NAMESPACE, REQUEST_PREFIX, DrainRequest, answer_key, encode_answer, request_key
from orchestrator.ray_cluster import NODE_NAME_LABEL
from worker.agent import agent_actor_class
from worker.replica import replica_actor_class


@dataclass(frozen=True)
class RayNode:
    node_id: str
    address: str
    alive: bool
    is_head: bool
    name: str | None


class RayCluster:
    def __init__(self) -> None:
        self._agent_cls = agent_actor_class()
        self._replica_cls = replica_actor_class()

    def list_nodes(self) -> list[RayNode]:
        out = []
        for node in ray.nodes():
            labels = node.get("Labels") or {}
            resources = node.get("Resources") or {}
            out.append(
                RayNode(
                    node_id=node["NodeID"],
                    address=node.get("NodeManagerAddress", ""),
                    alive=bool(node.get("Alive")),
                    is_head=any(k.startswith("node:__internal_head__") for k in resources) or bool(node.get("IsHead")),
                    name=labels.get(NODE_NAME_LABEL),
                )
            )
        return out

    @staticmethod
    def _on(node_id: str) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)

    def start_agent(self, node_id: str):
        return self._agent_cls.options(scheduling_strategy=self._on(node_id)).remote()

    async def report(self, agent, model_paths: dict[str, str], timeout_s: float) -> dict:
        return await asyncio.wait_for(_awaitable(agent.report.remote(model_paths)), timeout_s)

    async def read_shape(self, agent, path: str):
        return await asyncio.wait_for(_awaitable(agent.read_shape.remote(path)), 60)

    async def dry_run(self, agent, path: str, n_ctx: int, n_gpu_layers: int, kv_type: str, flash_attn: bool | None,
                      n_slots: int = 1) -> dict:
        ref = agent.dry_run.remote(path, n_ctx, n_gpu_layers, kv_type, flash_attn, n_slots)
        return await asyncio.wait_for(_awaitable(ref), 300)

    async def start_transfer(self, agent, spec: dict) -> dict:
        return await asyncio.wait_for(_awaitable(agent.start_transfer.remote(spec)), 30)

    async def transfer(self, agent, transfer_id: str) -> dict | None:
        return await asyncio.wait_for(_awaitable(agent.transfer.remote(transfer_id)), 10)

    async def cancel_transfer(self, agent, transfer_id: str) -> bool:
        return await asyncio.wait_for(_awaitable(agent.cancel_transfer.remote(transfer_id)), 10)

    async def remove_copy(self, agent, name: str) -> dict:
        return await asyncio.wait_for(_awaitable(agent.remove_copy.remote(name)), 30)

    async def start_rpc_server(self, agent, port: int, gpu_index: int | None) -> dict:
        return await asyncio.wait_for(_awaitable(agent.start_rpc_server.remote(port, gpu_index)), 60)

    async def stop_rpc_server(self, agent, port: int) -> bool:
        return await asyncio.wait_for(_awaitable(agent.stop_rpc_server.remote(port)), 30)

    @staticmethod
    def round_trip_ms(host: str, port: int) -> float | None:
        return tcp_round_trip_ms(host, port)

    def start_replica(self, node_id: str, replica_id: str, settings: dict):
        return self._replica_cls.options(
            scheduling_strategy=self._on(node_id), name=None
        ).remote(replica_id, settings)

    async def info(self, handle, timeout_s: float) -> dict:
        return await asyncio.wait_for(_awaitable(handle.info.remote()), timeout_s)

    async def load(self, handle, timeout_s: float) -> dict:
        return await asyncio.wait_for(_awaitable(handle.load.remote()), timeout_s)

    # ---- drain requests from `homefleet join`, through the GCS's KV (orchestrator/drain_channel.py)
    @staticmethod
    def drain_requests() -> list[DrainRequest]:
        from ray.experimental import internal_kv

        out = []
        for key in internal_kv._internal_kv_list(REQUEST_PREFIX, namespace=NAMESPACE):
            request = DrainRequest.decode(key, internal_kv._internal_kv_get(key, namespace=NAMESPACE))
            if request is not None:
                out.append(request)
        return out

    @staticmethod
    def answer_drain(request: DrainRequest, answer: dict) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(answer_key(request.node), encode_answer(request.request_id, answer),
                                     overwrite=True, namespace=NAMESPACE)
        internal_kv._internal_kv_del(request_key(request.node), namespace=NAMESPACE)

    @staticmethod
    def is_node_gone_error(exc: BaseException) -> bool:
        """The actor could not be placed on its node (the node died or left), as opposed to
        its process failing there."""
        return isinstance(exc, ray.exceptions.ActorUnschedulableError)

    @staticmethod
    def is_dead_actor_error(exc: BaseException) -> bool:
        """The actor's process is gone; not Ray's "temporarily unavailable" (a network blip),
        after which the same actor answers again."""
        return (isinstance(exc, ray.exceptions.RayActorError)
                and not isinstance(exc, ray.exceptions.ActorUnavailableError))

    @staticmethod
    def kill(handle) -> None:
        if handle is None:
            return
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass  # already gone


async def _awaitable(ref):
    return await ref


def tcp_round_trip_ms(host: str, port: int, tries: int = 5, timeout_s: float = 1.0) -> float | None:
    """Median time of a TCP connect to host:port, in ms (None: no answer)."""
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError:
            continue
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3) if times else None
