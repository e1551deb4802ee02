"""What the controller needs of its cluster, as a Protocol: the controller, its copy flow,
file keeper and residency, and the gateway's relay call exactly these methods on
`controller.cluster`. `RayCluster` (orchestrator/ray_actors.py) is the real one; the unit
tests pass a fake (tests/unit/test_controller.py `FakeCluster`). Handles of agents and
replicas are opaque: the controller only hands them back to the cluster.

No Ray here: the controller can be built and tested without a Ray runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

from orchestrator.core.model_shape import ModelShape
from orchestrator.drain_channel import DrainRequest

AgentHandle = Any  # a node's agent actor, as start_agent returned it
ReplicaHandle = Any  # a replica actor, as start_replica returned it


class ClusterNode(Protocol):
    """One node as the cluster lists it (`RayNode` in the Ray shell)."""

    @property
    def node_id(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    @property
    def is_head(self) -> bool: ...

    @property
    def name(self) -> str | None: ...


class Cluster(Protocol):
    # ---- nodes and their agents
    def list_nodes(self) -> list[ClusterNode]: ...

    def start_agent(self, node_id: str) -> AgentHandle: ...

    async def report(self, agent: AgentHandle, model_paths: dict[str, str], timeout_s: float) -> dict: ...

    async def read_shape(self, agent: AgentHandle, path: str) -> ModelShape: ...

    async def dry_run(self, agent: AgentHandle, path: str, n_ctx: int, n_gpu_layers: int, kv_type: str,
                      flash_attn: bool | None, n_slots: int = 1) -> dict: ...

    # ---- files moving between stores
    async def start_transfer(self, agent: AgentHandle, spec: dict) -> dict: ...

    async def transfer(self, agent: AgentHandle, transfer_id: str) -> dict | None: ...

    async def cancel_transfer(self, agent: AgentHandle, transfer_id: str) -> bool: ...

    async def remove_copy(self, agent: AgentHandle, name: str) -> dict: ...

    # ---- llama.cpp RPC servers of helper nodes, for splits across machines (worker/rpc_servers.py)
    async def start_rpc_server(self, agent: AgentHandle, port: int, gpu_index: int | None) -> dict:
        """{"endpoint": "HOST:PORT"} once the node's server listens, or {"error": why}."""
        ...

    async def stop_rpc_server(self, agent: AgentHandle, port: int) -> bool: ...

    def round_trip_ms(self, host: str, port: int) -> float | None:
        """The network round trip from here to a node's listening port (None: no answer)."""
        ...

    # ---- replicas
    def start_replica(self, node_id: str, replica_id: str, settings: dict) -> ReplicaHandle: ...

    async def info(self, handle: ReplicaHandle, timeout_s: float) -> dict: ...

    async def load(self, handle: ReplicaHandle, timeout_s: float) -> dict: ...

    def kill(self, handle: ReplicaHandle | None) -> None: ...

    # ---- drain requests from `homefleet join` (orchestrator/drain_channel.py)
    def drain_requests(self) -> list[DrainRequest]:
        """Nodes whose `join` asks the head to drain them before they leave."""
        ...

    def answer_drain(self, request: DrainRequest, answer: dict) -> None:
        """Tell the asking `join` how its drain went; the request is consumed."""
        ...

    # ---- what an error means
    def is_node_gone_error(self, exc: BaseException) -> bool:
        """The actor could not be placed on its node (the node died or left), as opposed to
        its process failing there."""
        ...

    def is_dead_actor_error(self, exc: BaseException) -> bool: ...
