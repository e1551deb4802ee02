"""The router: which replica of a model takes a request, and the in-flight count of each.

Reads the controller's replica table (`models`, `ready_replicas`, `model_state`,
`retry_after_s`, `nodes`); the choice itself is the pure `choose_replica` of the core.
Every `acquire` is matched by exactly one `release` (gateway/relay.py sees to it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from orchestrator.core.routing import choose_replica, overload_retry_after_s
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller, ReplicaRecord
    from orchestrator.gateway.metrics import GatewayMetrics, RequestOutcome

WAITING_STATES = ("copying", "downloading", "loading")


class Router:
    def __init__(self, controller: Controller, queue_per_replica: int, load_timeout_s: float = 300.0,
                 metrics: GatewayMetrics | None = None) -> None:
        self.controller = controller
        self.queue_per_replica = queue_per_replica
        self.load_timeout_s = load_timeout_s
        self.metrics = metrics

    # ---- models that load on demand --------------------------------------------------
    def needs_load(self, model: str, keep_alive=None) -> bool:
        """Whether the request must wait for `model` to load (it is known; its keep_alive noted).
        A 503 when too many requests wait for it already."""
        self.check_known(model)
        controller = self.controller
        if keep_alive is not None:
            controller.touch(model, keep_alive)
        if not controller.waits_for_load(model):
            return False
        config = controller.models[model]
        limit = (self.queue_per_replica + (config.parallel or 4)) * max(1, config.replicas)
        if controller.waiting.get(model, 0) >= limit:
            raise RequestError(
                f"{limit} requests already wait for '{model}' to load; retry shortly.",
                status=503, type="server_error", code="overloaded", retry_after_s=5)
        return True

    async def acquire_when_loaded(self, model: str, keep_alive=None, gone=None) -> ReplicaRecord:
        """`acquire`, after waiting (up to load_timeout_s) for an on-demand load."""
        if self.needs_load(model, keep_alive):
            await self.controller.wait_until_ready(model, self.load_timeout_s, gone=gone)
        return self.acquire(model)

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
        """A replica with room for one more request, counted in flight; else a 404 or 503
        (a 503 counted in the metrics, with no node: no replica took it)."""
        self.check_known(model)
        try:
            return self._acquire(model)
        except RequestError as exc:
            if self.metrics is not None:
                self.metrics.refused(model, exc.status)
            raise

    def _acquire(self, model: str) -> ReplicaRecord:
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
        replica = choose_replica(ready, lambda r: r.in_flight, self.queue_per_replica, lambda r: r.slots)
        if replica is None:
            slots = sum(r.slots for r in ready)
            raise RequestError(
                f"All {len(ready)} replica(s) of '{model}' are busy: {slots} request(s) decoding and "
                f"{len(ready) * self.queue_per_replica} waiting; retry shortly.",
                status=503,
                type="server_error",
                code="overloaded",
                retry_after_s=overload_retry_after_s(len(ready) * self.queue_per_replica, slots),
            )
        replica.in_flight += 1
        replica.flights_changed_at = time.monotonic()
        self.controller.touch(model)
        return replica

    def release(self, replica: ReplicaRecord, served: bool, epoch: int | None = None) -> None:
        """`epoch`: the replica's flight_epoch when the request began; a release from before the
        controller reconciled the count (controller.py `_reconcile_flights`) changes no count."""
        if epoch is None or epoch == replica.flight_epoch:
            replica.in_flight -= 1
            replica.flights_changed_at = time.monotonic()
        self.controller.touch(replica.model)
        if served:
            replica.served += 1
            node = self.controller.nodes.get(replica.node_id)
            if node is not None:
                node.requests_served += 1

    def finished(self, replica: ReplicaRecord, outcome: RequestOutcome) -> None:
        """A request's flight ended (after `release`): its tokens on the replica, its metrics."""
        replica.prompt_tokens += outcome.prompt_tokens
        replica.completion_tokens += outcome.completion_tokens
        if self.metrics is not None:
            self.metrics.request_done(outcome)
