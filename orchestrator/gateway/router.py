"""The router: which replica of a model takes a request, and the in-flight count of each.

Reads the controller's replica table (`models`, `ready_replicas`, `model_state`,
`retry_after_s`, `nodes`); the choice itself is the pure `choose_replica` of the core.
Every `acquire` is matched by exactly one `release` (gateway/relay.py sees to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.core.routing import choose_replica
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller, ReplicaRecord

WAITING_STATES = ("copying", "downloading", "loading")


class Router:
    def __init__(self, controller: Controller, queue_per_replica: int) -> None:
        self.controller = controller
        self.queue_per_replica = queue_per_replica

    def check_known(self, model: str) -> None:
        known = self.controller.models
        if model not in known:
            served = ", ".join(sorted(known)) or "none"
            raise RequestError(
                f"The model '{model}' does not exist. Models served here: {served}.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def acquire(self, model: str) -> ReplicaRecord:
        """A replica with room for one more request, counted in flight; else a 404 or 503."""
        self.check_known(model)
        ready = self.controller.ready_replicas(model)
        if not ready:
            state, reason = self.controller.model_state(model)
            detail = f": {reason}" if reason else ""
            retry = "; retry shortly" if state in WAITING_STATES else ""
            raise RequestError(
                f"The model '{model}' is {state}{detail}{retry}",
                status=503,
                type="server_error",
                code=f"model_{state}",
                retry_after_s=self.controller.retry_after_s(model),
            )
        replica = choose_replica(ready, lambda r: r.in_flight, self.queue_per_replica)
        if replica is None:
            raise RequestError(
                f"All {len(ready)} replica(s) of '{model}' are busy with full queues; retry shortly.",
                status=503,
                type="server_error",
                code="overloaded",
            )
        replica.in_flight += 1
        return replica

    def release(self, replica: ReplicaRecord, served: bool) -> None:
        replica.in_flight -= 1
        if served:
            replica.served += 1
            node = self.controller.nodes.get(replica.node_id)
            if node is not None:
                node.requests_served += 1
