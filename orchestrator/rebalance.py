"""Models return home (issue 11): when a machine joins or comes back and a model runs on a
worse node than the placement rules would pick now, it moves there make-before-break. A
mixin of the Controller.

After a join (once the node has reported, `REBALANCE_SETTLE_S` later), the rules place every
ready replica afresh, as if none ran (their memory given back). A replica moves when that
ideal gives it a better kind (whole on a GPU, then across machines' GPUs where the splitter
takes that, then a GPU/CPU split on one node, then the CPU), more GPU
layers, or, whole on a GPU either way, another card (the rules' smaller card: a small model
gives the 16 GB card back); and only where it fits *now*, beside everything running. A
better node that lacks the file gets a copy first (from a peer, or the model's `url`) while
the old replica serves, and the move follows once the node reports the file. The new
replica loads while the old one serves; once it is ready, routing switches to it and the
old one stops when its last request ends. One move at a time; a move that fails to load
leaves the old replica serving. A split across machines that fits only in the memory its
model holds now (the helper came back; the main card is the same) is taken break-before-make,
and only while nobody uses the model: it is unloaded and loaded again split.
`cluster.rebalance: false` turns it off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from orchestrator.copy_flow import TRANSFER_LOST_S
from orchestrator.core.eviction import Evictable, freed_snapshots
from orchestrator.core.placement import place
from orchestrator.core.placement_types import Assignment

if TYPE_CHECKING:
    from orchestrator.controller import ReplicaRecord

log = logging.getLogger(__name__)
REBALANCE_SETTLE_S = 5.0  # after a join: let the node report and the loads settle
FETCH_CHECK_S = 5.0  # while a file travels to a move's target: look again this often
KIND_RANK = {"gpu": 0, "rpc": 1, "split": 2, "cpu": 3}  # rpc: across machines' GPUs


def better(ideal: Assignment, now: Assignment) -> bool:
    """Whether the rules' ideal is worth a move from where a replica runs now."""
    if KIND_RANK[ideal.kind] != KIND_RANK[now.kind]:
        return KIND_RANK[ideal.kind] < KIND_RANK[now.kind]
    if ideal.kind == "split":
        return ideal.gpu_layers > now.gpu_layers
    if ideal.kind == "gpu":
        return (ideal.node, ideal.gpu_index) != (now.node, now.gpu_index)
    return False  # CPU only, or across machines, either way: a move buys nothing worth its churn


class Rebalance:
    def _init_rebalance(self) -> None:
        self.moves: dict[tuple[str, int], ReplicaRecord] = {}  # key -> the new replica, loading
        self.retiring: list[ReplicaRecord] = []  # moved away from: stop once idle
        self._rebalance_at: float | None = None
        self.move_fetches: dict[tuple[str, str], tuple[str, float]] = {}  # (model, node) -> its copy's id, start

    def node_joined(self) -> None:
        if self.config.cluster.rebalance:
            self._rebalance_at = time.monotonic() + REBALANCE_SETTLE_S

    def _rebalance(self, demands: list) -> None:
        """Start at most one move (see the module docstring)."""
        if self._rebalance_at is None or time.monotonic() < self._rebalance_at or self.moves:
            return
        if any(r.state != "ready" for r in self.replicas.values()):
            return  # loads, copies and unloads first: then look again
        self._rebalance_at = None
        ready = {(r.model, r.index): r for r in self.replicas.values()}
        mine = [d for d in demands if (d.model, d.replica) in ready]
        freed = self._snapshots_without(list(ready.values()))
        splitter = self._splitter()
        ideal = place(freed, mine, splitter=splitter)
        for target in ideal.assignments:
            record = ready[(target.model, target.replica)]
            if not better(target, record.assignment):
                continue
            others = [r.assignment for r in ready.values() if r is not record]
            demand = next(d for d in mine if (d.model, d.replica) == (target.model, target.replica))
            if target.kind != "rpc":  # on the ideal's node (a split across machines cannot be pinned)
                demand = replace(demand, pin_node=target.node)
            now = place(self._ledger_snapshots(), [demand], current=others, splitter=splitter)
            if not now.assignments or not better(now.assignments[0], record.assignment):
                if target.kind == "rpc" and self._restart_into_split(record, demand, others, splitter):
                    return
                continue  # it does not fit there beside what runs now
            if self._start_move(record, now.assignments[0]):
                self._rebalance_at = self._rebalance_at or time.monotonic()  # then look for the next one
                return

    def _restart_into_split(self, record: ReplicaRecord, demand, others: list, splitter) -> bool:
        """A split across machines (a helper came back) that fits only once this replica's own
        memory is free, as on the same card: if nobody uses the model now, unload it; the tick
        loads it again as the split (break-before-make, while nobody waits)."""
        if self.busy(record.model):
            return False
        freed = place(self._snapshots_without([record]), [demand], current=others, splitter=splitter)
        if not freed.assignments or freed.assignments[0].kind != "rpc":
            return False
        split = freed.assignments[0]
        why = (f"{record.replica_id} is idle: unloaded from {record.node_name} ({record.assignment.kind}) to load "
               f"again across machines, {split.describe()}: {split.split_why}")
        self._spawn(self._retire(record, why, kind="moving"))
        self._rebalance_at = self._rebalance_at or time.monotonic()  # then look for the next one
        return True

    def _snapshots_without(self, records: list) -> list:
        """The ledger's nodes with these replicas' memory given back."""
        gone = [Evictable(r.assignment, 0.0, None, *self._freed_by(r)) for r in records]
        return freed_snapshots(self._ledger_snapshots(), gone)

    def _start_move(self, record: ReplicaRecord, target: Assignment) -> bool:
        node = next((n for n in self.nodes.values() if n.alive and n.name == target.node), None)
        held = self.files.holders(record.model).get(target.node)
        model = self.models.get(record.model)
        if node is None or model is None:
            return False
        if held is None:
            return self._fetch_for_move(record, model, node)
        fetched = self.move_fetches.pop((record.model, target.node), None)
        if fetched is not None:
            transfer_id, started = fetched
            progress = node.transfers.get(transfer_id)
            seconds = time.monotonic() - started
            self.record_event("copied", record.model, node.name,
                              f"{held.name} copied to {node.name} for a move, in {seconds:.1f} s",
                              seconds=seconds, bytes=progress.total_bytes if progress else None,
                              method=progress.kind if progress else None)
        new = self._new_replica(model, target, node, held.path)
        key = (record.model, record.index)
        self.moves[key] = new
        why = f"{record.replica_id} moves from {record.node_name} ({record.assignment.kind}) to {target.node} " \
              f"({target.kind}, {target.gpu_layers}/{target.n_layers} layers on GPU)"
        log.info(why)
        self.record_event("moving", record.model, target.node, why)
        self._spawn(self._load_move(key, record, new))
        return True

    def _fetch_for_move(self, record: ReplicaRecord, model, node) -> bool:
        """The better node lacks the file: copy it there (once), and look again until the node
        reports it. True while the copy runs (no other move starts meanwhile)."""
        key = (record.model, node.name)
        if key in self.move_fetches:
            transfer_id, started = self.move_fetches[key]
            progress = node.transfers.get(transfer_id)
            lost = progress is None and time.monotonic() - started > TRANSFER_LOST_S
            if lost or (progress is not None and progress.state in ("failed", "cancelled")):
                detail = "its node no longer reports it" if lost else progress.error or progress.state
                why = f"copying {record.model}'s file to {node.name} for a move failed: {detail}"
                log.warning(why)
                self.record_event("move_abandoned", record.model, node.name, why)
                del self.move_fetches[key]  # a later join tries again
                return False
            self._rebalance_at = time.monotonic() + FETCH_CHECK_S  # copying, or done and not yet reported
            return True
        spec = self.files.transfer_spec(model, node.name)
        if isinstance(spec, str) or node.agent is None:
            return False  # no source for now (e.g. still hashing); the next join looks again
        self.move_fetches[key] = (spec.transfer_id, time.monotonic())
        why = f"{node.name} fits {record.replica_id} better than {record.node_name}: copying {spec.name} there " \
              f"first from {spec.sources[0].label}"
        log.info(why)
        self.record_event("fetching_for_move", record.model, node.name, why)
        self._spawn(self.cluster.start_transfer(node.agent, spec.as_dict()))
        self._rebalance_at = time.monotonic() + FETCH_CHECK_S
        return True

    async def _load_move(self, key: tuple[str, int], old: ReplicaRecord, new: ReplicaRecord) -> None:
        refused = await self._start_helpers(new) if new.assignment.helpers else None
        try:
            if refused is not None:
                info = {"state": "failed", "reason": f"split across machines not used: {refused}"}
            else:
                info = await self.cluster.load(new.handle, self.config.gateway.load_timeout_s)
        except Exception as exc:  # the old replica keeps serving
            info = {"state": "failed", "reason": f"{type(exc).__name__}"}
        self.moves.pop(key, None)
        new.info = info
        if info.get("state") != "ready" or self.replicas.get(key) is not old or old.state != "ready":
            log.warning("move of %s to %s abandoned: %s", new.replica_id, new.node_name, info.get("reason"))
            await self._kill(new.handle)
            return
        new.state = "ready"
        self.replicas[key] = new  # routing switches here
        old.state, old.reason = "unloading", f"moved to {new.node_name}"
        self.retiring.append(old)
        self.record_event("moved", new.model, new.node_name,
                          f"{new.replica_id} moved from {old.node_name} to {new.node_name}",
                          seconds=info.get("load_seconds"))  # its load, for the load-duration histogram
        self.states_changed()
        await self._stop_retired()

    async def _stop_retired(self) -> None:
        for record in [r for r in self.retiring if r.in_flight == 0]:
            self.retiring.remove(record)
            await self._kill(record.handle)
