"""Draining a node (issue 11): `homefleet drain NODE` (`POST /api/nodes/{name}/drain`), and
`homefleet join` on Ctrl-C or SIGTERM, which asks through Ray's KV (orchestrator/drain_channel.py).
A mixin of the Controller.

1. The node is marked draining: placement leaves it out (`_snapshots`), so nothing new is
   started there.
2. Each ready replica on it is started elsewhere first, make-before-break (rebalance.py's
   `_start_move`): the pure `place()` over the ledger of the other nodes, among those that
   hold the model's file. The old replica serves until the new one is ready, then routing
   switches and the old one stops after its last request. A replica that fits nowhere else
   (or whose move fails to load) stops after its requests: its model waits, pending, for a
   node with room. A replica still copying or loading there is stopped at once; placement
   starts it elsewhere.
3. The drain ends when nothing of ours runs there, or at its timeout (default 60 s): then
   whatever is left stops, cutting the requests still running on it (a move still loading
   is abandoned, and its model placed again). The answer says what moved where and what
   stopped.

The node stays draining until `homefleet undrain`, or until it comes back as a new Ray node
(join stopped and started again, a machine back from sleep), or the head wakes it
(orchestrator/wake.py).

While a replica on a draining node waits to be replaced or stopped, placement leaves its
key alone (`_may_start`): with the node left out of the ledger the replica would look
unplaced, and idle models could be evicted for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.core.placement import place
from orchestrator.core.placement_types import Assignment
from orchestrator.drain_channel import DrainRequest, describe_drain
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import NodeRecord, ReplicaRecord

log = logging.getLogger(__name__)
DEFAULT_DRAIN_TIMEOUT_S = 60.0
MAX_DRAIN_TIMEOUT_S = 3600.0


@dataclass
class DrainJob:
    node: str
    node_id: str  # the Ray node drained: a new one under the name is not draining
    timeout_s: float
    started_at: float
    done: asyncio.Future
    moving: dict[tuple[str, int], tuple[str, ReplicaRecord]] = field(default_factory=dict)  # key -> (to, old)
    moved: list[dict] = field(default_factory=list)
    stopped: list[dict] = field(default_factory=list)
    cut_requests: int = 0
    result: dict | None = None

    @property
    def deadline(self) -> float:
        return self.started_at + self.timeout_s

    def summary(self, state: str, timed_out: bool = False) -> dict:
        return {"node": self.node, "state": state, "moved": self.moved, "stopped": self.stopped,
                "cut_requests": self.cut_requests, "timed_out": timed_out,
                "seconds": round(time.monotonic() - self.started_at, 2)}


class Drain:
    def _init_drain(self) -> None:
        self.drains: dict[str, DrainJob] = {}  # node name -> its latest drain
        self._drain_requests_seen: set[str] = set()

    # ---- the admin surface ---------------------------------------------------------------
    async def drain_node(self, name: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> dict:
        """Drain `name` (see the module docstring) and answer its summary when it ends. A
        drain already running is joined, not started again. 404 for a node nobody knows,
        409 for one that is gone."""
        job = self.start_drain(name, timeout_s)
        return await asyncio.shield(job.done)  # a client that leaves does not stop the drain

    def start_drain(self, name: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> DrainJob:
        node = self._live_node_named(name)
        running = self.drains.get(name)
        if running is not None and running.result is None:
            return running
        timeout_s = min(max(0.0, float(timeout_s)), MAX_DRAIN_TIMEOUT_S)
        job = DrainJob(name, node.node_id, timeout_s, time.monotonic(), asyncio.get_running_loop().create_future())
        self.drains[name] = job
        node.draining = True
        here = [r.replica_id for r in self.replicas.values() if r.node_id == node.node_id]
        self.record_event("draining", "*", name, f"{name} drains: no new work; "
                          f"{', '.join(here) or 'nothing'} to move or stop within {timeout_s:g} s")
        log.info("draining %s (%s)", name, ", ".join(here) or "nothing runs there")
        self.wake()
        return job

    async def undrain_node(self, name: str) -> dict:
        """Let placement use `name` again; a drain still running ends (moves under way finish)."""
        nodes = [n for n in self.nodes.values() if n.name == name]
        if not nodes:
            raise self._no_such_node(name)
        was = any(n.draining for n in nodes)
        for node in nodes:
            node.draining = False
        job = self.drains.get(name)
        if job is not None and job.result is None:
            self._finish_drain(job, "undrained")
        if was:
            self.record_event("undrained", "*", name, f"{name} takes new work again")
        self.wake()
        return {"node": name, "draining": False, "was_draining": was}

    def _live_node_named(self, name: str) -> NodeRecord:
        nodes = [n for n in self.nodes.values() if n.name == name]
        if not nodes:
            raise self._no_such_node(name)
        live = next((n for n in nodes if n.alive), None)
        if live is None:
            raise RequestError(f"The node '{name}' is gone (not in the fleet): nothing runs there to drain.",
                               status=409, param="name", code="node_gone")
        return live

    def _no_such_node(self, name: str) -> RequestError:
        known = ", ".join(sorted({n.name for n in self.nodes.values() if n.name})) or "none"
        return RequestError(f"No node is named '{name}'. Nodes: {known}.", status=404, param="name",
                            code="node_not_found")

    # ---- each tick -------------------------------------------------------------------------
    async def _drain_step(self) -> None:
        await self._take_drain_requests()
        for job in [j for j in self.drains.values() if j.result is None]:
            await self._advance_drain(job)
        self._end_drains_of_new_nodes()

    async def _advance_drain(self, job: DrainJob) -> None:
        node = self.nodes.get(job.node_id)
        if node is None or not node.alive:  # it left (or came back as a new node): nothing of ours is there
            self._finish_drain(job, "left")
            return
        await self._follow_moves(job)
        for record in self._replicas_on(node):
            if (record.model, record.index) in job.moving or record.state == "unloading":
                continue
            if record.state != "ready":
                await self._stop_for_drain(job, record, f"was {record.state} there: placed again on another node")
                continue
            target = self._drain_target(record)
            if isinstance(target, Assignment) and self._start_move(record, target):
                job.moving[(record.model, record.index)] = (target.node, record)
            else:
                why = target if isinstance(target, str) else f"could not be started on {target.node}"
                await self._stop_for_drain(job, record, why)
        if time.monotonic() >= job.deadline and self._anything_on(node, job):
            await self._cut(job, node)
            self._finish_drain(job, "drained", timed_out=True)
        elif not self._anything_on(node, job):
            self._finish_drain(job, "drained")

    async def _follow_moves(self, job: DrainJob) -> None:
        for key, (target, old) in list(job.moving.items()):
            if key in self.moves:
                continue  # the new replica still loads; the old one serves meanwhile
            del job.moving[key]
            current = self.replicas.get(key)
            if current is not None and current is not old and current.node_name == target:
                job.moved.append({"replica": old.replica_id, "model": old.model, "to": target,
                                  "kind": current.assignment.kind})
            elif current is old:
                await self._stop_for_drain(job, old, f"its move to {target} did not load")
            # else: the old replica died meanwhile; placement starts the model again

    def _drain_target(self, record: ReplicaRecord) -> Assignment | str:
        """Where the rules put the replica among the other nodes that hold its file, or why nowhere."""
        model = self.models.get(record.model)
        if model is None or record.model not in self.shapes:
            return "no longer configured as it was"
        demand = next((d for d in self._demands(model) if d.replica == record.index), None)
        if demand is None:
            return "its memory need is not known yet"
        snapshots = self._ledger_snapshots()  # the draining node is not among them
        holders = self.files.holders(record.model)
        with_file = place([s for s in snapshots if s.name in holders], [demand])
        if with_file.assignments:
            return with_file.assignments[0]
        anywhere = place(snapshots, [demand])
        if anywhere.assignments:
            return (f"only {anywhere.assignments[0].node} has room and it lacks the file: "
                    "placed there, after a copy, once stopped here")
        return "no other node has room" + (f" ({anywhere.unplaced[0].summary})" if anywhere.unplaced else "")

    async def _stop_for_drain(self, job: DrainJob, record: ReplicaRecord, reason: str) -> None:
        job.stopped.append({"replica": record.replica_id, "model": record.model, "reason": reason})
        await self._retire(record, f"{job.node} drains: {reason}", kind="drained")

    async def _cut(self, job: DrainJob, node: NodeRecord) -> None:
        """The timeout: stop what is left on the node now, with its requests."""
        for target, old in job.moving.values():
            job.stopped.append({"replica": old.replica_id, "model": old.model,
                                "reason": f"its move to {target} had not finished within {job.timeout_s:g} s"})
        job.moving.clear()
        for record in self._replicas_on(node):
            job.cut_requests += record.in_flight
            await self._drop(record)
        for record in [r for r in self.retiring if _uses(r, node)]:
            job.cut_requests += record.in_flight
            self.retiring.remove(record)
            await self._kill(record.handle)
        log.warning("drain of %s timed out after %g s: %d request(s) cut", job.node, job.timeout_s, job.cut_requests)

    def _replicas_on(self, node: NodeRecord) -> list[ReplicaRecord]:
        """The replicas that run there, or use its GPU in a split across machines."""
        return [r for r in self.replicas.values() if _uses(r, node)]

    def _anything_on(self, node: NodeRecord, job: DrainJob) -> bool:
        return bool(job.moving or self._replicas_on(node) or any(_uses(r, node) for r in self.retiring))

    def _finish_drain(self, job: DrainJob, state: str, timed_out: bool = False) -> None:
        job.result = job.summary(state, timed_out)
        if not job.done.done():
            job.done.set_result(job.result)
        self.record_event("drained" if state == "drained" else f"drain_{state}", "*", job.node,
                          describe_drain(job.result))
        log.info(describe_drain(job.result))
        self.states_changed()

    def _end_drains_of_new_nodes(self) -> None:
        """A drained machine that comes back as a new Ray node (join restarted, back from sleep) takes work again."""
        for node in self.nodes.values():
            job = self.drains.get(node.name or "")
            if node.draining and node.alive and job is not None and job.result is not None \
                    and job.node_id != node.node_id:
                node.draining = False
                self.record_event("undrained", "*", node.name, f"{node.name} is back as a new node: takes work again")

    def _may_start(self, key: tuple[str, int]) -> bool:
        """Placement leaves a replica on a draining node to the drain (see the module docstring)."""
        record = self.replicas.get(key)
        if record is not None and any(_uses(record, n) for n in self.nodes.values() if n.draining):
            return False
        return super()._may_start(key)

    # ---- join's requests, through Ray's KV ------------------------------------------------
    async def _take_drain_requests(self) -> None:
        try:
            requests = await asyncio.to_thread(self.cluster.drain_requests)
        except Exception as exc:  # Ray's KV is not worth a failed tick
            log.debug("could not read drain requests: %s", exc)
            return
        for request in requests:
            if request.request_id in self._drain_requests_seen:
                continue
            self._drain_requests_seen.add(request.request_id)
            log.info("%s asks to be drained before it leaves", request.node)
            try:
                job = self.start_drain(request.node, request.timeout_s)
            except RequestError as exc:
                self._spawn(self._answer_drain(request, {"node": request.node, "state": "refused",
                                                         "error": exc.message}))
                continue
            job.done.add_done_callback(lambda done, request=request: self._spawn(
                self._answer_drain(request, done.result())))

    async def _answer_drain(self, request: DrainRequest, answer: dict) -> None:
        try:
            await asyncio.to_thread(self.cluster.answer_drain, request, answer)
        except Exception as exc:
            log.warning("could not answer %s's drain request: %s", request.node, exc)


def _uses(record: ReplicaRecord, node: NodeRecord) -> bool:
    """Whether the replica runs on `node` or uses its GPU as a split's helper."""
    return record.node_id == node.node_id or any(h.node == node.name for h in record.assignment.helpers)
