"""Replicas that crash, and failures that should not last for ever (issue 11). A mixin of the
Controller, beside CopyFlow and Residency.

- A replica whose process dies (killed, aborted, out of memory), or whose load dies, is
  started again after a backoff (orchestrator/core/restarts.py); after repeated crashes it
  is `failed` with its last reason.
- A failed replica (a crash streak, or a model llama.cpp cannot load) is tried again after
  the cool-down, or as soon as the set of live nodes changes (a machine joined or came back).
- A load whose node died is placed again at once: not the model's fault.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from orchestrator.core.restarts import DEFAULT_POLICY, RestartPolicy, after_crash

if TYPE_CHECKING:
    from orchestrator.controller import ReplicaRecord

log = logging.getLogger(__name__)
LOAD_FAILURE_COOL_DOWN_S = 600.0
AGENT_PROBE_S = 3.0  # a node whose agent does not answer this fast is taken as gone, not crashed
NODE_LOST_HOLD_S = 5.0


class ReplicaFaults:
    def _init_faults(self, policy: RestartPolicy = DEFAULT_POLICY) -> None:
        self.restart_policy = policy
        self.crash_times: dict[tuple[str, int], list[float]] = {}
        self.held_until: dict[tuple[str, int], tuple[float, str]] = {}  # key -> (not before, why)
        self.failed_until: dict[tuple[str, int], float] = {}
        self._live_node_names: frozenset[str] = frozenset()

    async def replica_died(self, replica: ReplicaRecord, reason: str) -> None:
        """A replica's process is gone: forget it; placement starts another after a backoff."""
        key = (replica.model, replica.index)
        if self.replicas.get(key) is not replica:
            return
        del self.replicas[key]
        await self._bury(replica, reason)

    def replica_lost(self, replica: ReplicaRecord, reason: str) -> None:
        """replica_died for the gateway: routing forgets the replica now, and the client's
        error goes out at once while the agents are asked why (seconds, if a machine is gone)."""
        key = (replica.model, replica.index)
        if self.replicas.get(key) is replica:
            del self.replicas[key]
            # Held now, not once _bury gets to it: a tick meanwhile would place it again at once.
            self.held_until[key] = (time.monotonic() + 3 * AGENT_PROBE_S, f"{replica.replica_id} stopped: {reason}")
            self._spawn(self._bury(replica, reason))

    async def _bury(self, replica: ReplicaRecord, reason: str) -> None:
        await self._kill(replica.handle)
        await self._crashed(replica, reason)

    async def _crashed(self, replica: ReplicaRecord, reason: str) -> None:
        key = (replica.model, replica.index)
        now = time.monotonic()
        # Held while the agents are asked whether its machines are still there (seconds): the
        # tick may run meanwhile and would place it again on a machine that is gone.
        self.held_until[key] = (now + 3 * AGENT_PROBE_S, f"{replica.replica_id} stopped: {reason}")
        if not await self._node_answers(replica.node_id):
            # Its machine went (asleep, cut off): not the model's fault, no backoff. Placement
            # starts it elsewhere once Ray says the node is gone (a short hold till then).
            why = f"{replica.node_name} stopped answering (asleep or cut off): placing it again"
            log.warning("%s: %s", replica.replica_id, why)
            self.record_event("node_lost", replica.model, replica.node_name, why)
            self.held_until[key] = (now + NODE_LOST_HOLD_S, why)
            self.states_changed()
            return
        lost = await self._lost_helper(replica) if replica.assignment.helpers else None
        if lost is not None:  # a split's helper went: not the model's fault; placed again without it
            why = f"helper {lost} of its split stopped answering (asleep or cut off): placing it again without it"
            log.warning("%s: %s", replica.replica_id, why)
            self.record_event("node_lost", replica.model, lost, why)
            self.held_until.pop(key, None)
            self.states_changed()
            return
        self.held_until.pop(key, None)  # its machines answer: the backoff decides
        decision = after_crash(self.crash_times.get(key, ()), now, self.restart_policy)
        self.crash_times[key] = [t for t in self.crash_times.get(key, ()) if now - t <= self.restart_policy.window_s]
        self.crash_times[key].append(now)
        text = decision.describe(now, reason)
        log.warning("%s on %s: %s", replica.replica_id, replica.node_name, text)
        self.record_event("crashed", replica.model, replica.node_name, text)
        if decision.failed:
            replica.state, replica.reason = "failed", text
            self.failed_keys[key] = replica
            self.failed_until[key] = decision.at
        else:
            self.held_until[key] = (decision.at, text)
        self.states_changed()

    async def _node_answers(self, node_id: str) -> bool:
        """Whether the node's agent still answers: a replica that died on a live node crashed."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive or node.agent is None:
            return False
        try:
            await self.cluster.report(node.agent, {}, timeout_s=AGENT_PROBE_S)
            return True
        except Exception:
            return False

    def _load_failed(self, key: tuple[str, int], record: ReplicaRecord) -> None:
        """llama.cpp could not load it: failed with the reason, tried again after a cool-down."""
        self.failed_keys[key] = record
        self.failed_until[key] = time.monotonic() + LOAD_FAILURE_COOL_DOWN_S

    def _may_start(self, key: tuple[str, int]) -> bool:
        if key in self.failed_keys:
            return False
        held = self.held_until.get(key)
        return held is None or held[0] <= time.monotonic()

    def _hold_reason(self, model: str) -> str | None:
        now = time.monotonic()
        for (name, _), (at, why) in self.held_until.items():
            if name == model and at > now:
                return why
        return None

    def _forgive_failures(self) -> None:
        """Failed replicas whose cool-down is over, or all of them when the live nodes changed."""
        live = frozenset(n.name for n in self.nodes.values() if n.alive and n.name)
        changed = bool(self._live_node_names) and live != self._live_node_names
        self._live_node_names = live
        now = time.monotonic()
        for key in list(self.failed_keys):
            if changed or self.failed_until.get(key, float("inf")) <= now:
                log.info("trying %s#%d again (%s)", key[0], key[1], "the nodes changed" if changed else "cool-down over")
                self.failed_keys.pop(key)
                self.failed_until.pop(key, None)
                self.crash_times.pop(key, None)
        self.held_until = {k: v for k, v in self.held_until.items() if v[0] > now}
