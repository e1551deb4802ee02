"""Which models are loaded: at start or on demand, kept while used, unloaded when idle, or
unloaded to make room for another (issue 9). A mixin of the Controller, beside CopyFlow.

- A model is *wanted* while it should have replicas: `load: always` models from the start,
  `load: on_demand` ones from their first request (or `homefleet load`) until they are
  unloaded. Placement sees only the demands of wanted models.
- A request for a model that is not loaded makes it wanted and waits (`wait_until_ready`)
  for the one load that every waiting request shares.
- Each tick, replicas idle past their keep_alive are unloaded; a wanted replica that fits
  nowhere gets room from the idle models the pure planner (orchestrator/core/eviction.py)
  picks on the node the rules prefer. A model is unloaded whole, never a part of it.
- Idle: no request in flight and none waiting for it. Evictable: idle, not `load: always`
  and not pinned (its keep_alive is for ever: `-1`, in the config or from a request).
- The ledger: a ready replica's memory that the node's measured figures do not show is
  held for it: on a declared node all of it; on a probed node the RAM the estimate counts
  beyond the process's anonymous memory (mapped weights are counted as *available* by
  the OS, yet a second model cannot use them).
- Every unload is an event with its reason (`events`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from orchestrator.core.eviction import Evictable, RoomPlan, expired, expiry_reason, plan_room
from orchestrator.core.keep_alive import parse_keep_alive
from orchestrator.core.placement_types import Assignment, ModelDemand, NodeSnapshot, Unplaced
from orchestrator.event_log import EVENTS_KEPT, EventLog
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import ReplicaRecord

log = logging.getLogger(__name__)

MAKING_ROOM_GRACE_S = 15.0  # after an eviction, how long a model may wait for the memory to show as free
LOADING_STATES = ("loading", "copying", "downloading")


class Residency:
    def _init_residency(self) -> None:
        self.wanted: set[str] = {m.name for m in self.config.models if m.load == "always"}
        self.last_used: dict[str, float] = {}
        self.keep_alive_override: dict[str, float | None] = {}  # from requests (Ollama's keep_alive)
        self.waiting: dict[str, int] = {}  # requests waiting for a model to load
        self.loaded_on_request: set[str] = set()  # `always` models unloaded, then wanted again by a request
        self.cannot_place: dict[str, Unplaced] = {}  # wanted, yet fits nowhere even with room made
        self.room_made_at: dict[str, float] = {}
        self.events = EventLog(EVENTS_KEPT)  # orchestrator/event_log.py: ids for `since=`
        self._changed: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None

    # ---- the clock of use ----------------------------------------------------------------
    def keep_alive_s(self, name: str) -> float | None:
        if name in self.keep_alive_override:
            return self.keep_alive_override[name]
        model = self.models.get(name)
        return model.keep_alive_s if model is not None else None

    def touch(self, name: str, keep_alive: object = None) -> None:
        """A request used the model now; `keep_alive` (a request's) changes how long it stays."""
        self.last_used[name] = time.monotonic()
        if keep_alive is not None:
            self.keep_alive_override[name] = parse_keep_alive(keep_alive)

    def busy(self, name: str) -> bool:
        return self.waiting.get(name, 0) > 0 or any(r.in_flight for r in self.replicas.values() if r.model == name)

    def unloads_in_s(self, name: str) -> float | None:
        """Seconds until an idle unload (None: never; while busy, its whole keep_alive)."""
        keep = self.keep_alive_s(name)
        if keep is None:
            return None
        if self.busy(name):
            return keep
        return max(0.0, self.last_used.get(name, time.monotonic()) + keep - time.monotonic())

    # ---- wake-ups ------------------------------------------------------------------------
    def wake(self) -> None:
        """Run the next tick now (a request waits for a load)."""
        if self._wake is not None:
            self._wake.set()

    async def _sleep_until_woken(self, seconds: float) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def states_changed(self) -> None:
        """Tell waiting requests to look again (a replica became ready or failed)."""
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    async def _state_change(self, timeout_s: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    # ---- loading on request ----------------------------------------------------------------
    def waits_for_load(self, name: str) -> bool:
        """Whether a request for `name` should wait rather than get a 503: the model is not
        loaded and its load is on demand (its first request's, or an unloaded model's)."""
        if self.ready_replicas(name):
            return False
        model = self.models.get(name)
        if model is None or model.replicas == 0:
            return False
        return (model.load == "on_demand" or name not in self.wanted or name in self.loaded_on_request
                or self.could_wake_for(name))

    def request_load(self, name: str) -> None:
        if name not in self.wanted:
            self.wanted.add(name)
            self.loaded_on_request.add(name)  # its next requests wait for this load too
            self.cannot_place.pop(name, None)
            self.room_made_at.pop(name, None)
            self.last_used.setdefault(name, time.monotonic())
            self.record_event("load_requested", name, None, "a request for a model that was not loaded")
        self.wake()

    async def wait_until_ready(self, name: str, timeout_s: float, on_progress=None, gone=None) -> None:
        """Make `name` wanted and wait until a replica is ready: RequestError 503 if it fails,
        fits nowhere, or takes longer than `timeout_s`. `on_progress(state, percent, detail)`
        is called about every second; `gone()` says the client left (stop waiting)."""
        self.request_load(name)
        self.waiting[name] = self.waiting.get(name, 0) + 1
        deadline = time.monotonic() + timeout_s
        try:
            while not self.ready_replicas(name):
                deadline, waking = self._hold_while_waking(name, deadline, timeout_s)  # orchestrator/wake.py
                problem = None if waking else self._load_problem(name)
                if problem is not None:
                    raise problem
                if time.monotonic() > deadline:
                    state, reason = self.model_state(name)
                    raise RequestError(
                        f"The model '{name}' did not load within {timeout_s:g} s (gateway.load_timeout_s): it is "
                        f"{state}{': ' + reason if reason else ''}", status=503, type="server_error",
                        code="model_load_timeout", retry_after_s=10)
                if gone is not None and await gone():
                    raise asyncio.CancelledError
                if on_progress is not None:
                    on_progress(*self.load_progress(name))
                await self._state_change(1.0)
        finally:
            self.waiting[name] -= 1
            if not self.waiting[name]:
                del self.waiting[name]
            self.last_used[name] = time.monotonic()

    def _load_problem(self, name: str) -> RequestError | None:
        if name not in self.models:
            return RequestError(f"The model '{name}' is no longer configured", status=404, param="model",
                                code="model_not_found")
        state, reason = self.model_state(name)
        if state == "failed":
            return RequestError(f"The model '{name}' failed to load: {reason}", status=503, type="server_error",
                                code="model_failed")
        miss = self.cannot_place.get(name)
        if miss is not None:
            return RequestError(
                f"The model '{name}' cannot be placed: no node has room even after unloading idle models: "
                f"{miss.summary}", status=503, type="server_error", code="model_not_placeable",
                retry_after_s=30)
        return None

    def load_progress(self, name: str) -> tuple[str, int | None, str | None]:
        """(state, percent or None, detail) of a model on its way to ready."""
        for r in self.replicas.values():
            if r.model != name:
                continue
            if r.fetching and r.transfer is not None and r.transfer.percent is not None:
                return r.state, int(r.transfer.percent), f"to {r.node_name}"
            if r.state == "loading":
                progress = r.info.get("load_progress")
                return "loading", int(100 * progress) if progress is not None else None, f"on {r.node_name}"
        state, reason = self.waking_state(name) or self.model_state(name)
        return state, None, reason

    # ---- the admin surface ----------------------------------------------------------------
    def _known(self, name: str) -> None:
        if name not in self.models:
            served = ", ".join(sorted(self.models)) or "none"
            raise RequestError(f"The model '{name}' does not exist. Models configured here: {served}.",
                               status=404, param="model", code="model_not_found")

    async def load_model(self, name: str, wait: bool = True, timeout_s: float | None = None) -> dict:
        """`homefleet load`: make it wanted and (with `wait`) wait until it is ready."""
        self._known(name)
        if self.models[name].replicas == 0:
            raise RequestError(f"The model '{name}' has replicas: 0 in the config", status=503,
                               type="server_error", code="model_not_placeable")
        if wait:
            await self.wait_until_ready(name, timeout_s or self.config.gateway.load_timeout_s)
        else:
            self.request_load(name)
        state, _ = self.model_state(name)
        nodes = sorted({r.node_name for r in self.replicas.values() if r.model == name})
        return {"model": name, "state": state, "node": nodes[0] if nodes else None}

    async def reload_config(self, config) -> dict:
        """A new config: models added, removed ones unloaded once their requests finish,
        changed ones reloaded (unloaded, then placed again with the new settings)."""
        old = {m.name: m for m in self.config.models}
        new = {m.name: m for m in config.models}
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and _reload_needed(old[n], new[n])]
        unchanged = [n for n in new if n in old and n not in changed]
        self.config = config
        self.files.config = config
        for name in removed + changed:
            await self.unload_model(name, "removed from the config" if name in removed else "its config changed",
                                    kind="unloaded")
            for cache in (self.shapes, self._demand_cache, self.calibrations, self.model_problems, self.unplaced):
                cache.pop(name, None)
            self.failed_keys = {k: r for k, r in self.failed_keys.items() if k[0] != name}
            self.files.resolved.pop(name, None)
            self.last_used.pop(name, None)
        for name in added + changed:
            if new[name].load == "always":
                self.wanted.add(name)
        for name in unchanged:  # load and keep_alive apply at once
            if old[name].keep_alive != new[name].keep_alive:
                self.keep_alive_override.pop(name, None)
            if new[name].load == "always" and old[name].load != "always":
                self.wanted.add(name)
        self.record_event("reloaded", "*", None, f"added {added}, removed {removed}, changed {changed}")
        self.wake()
        return {"added": added, "removed": removed, "changed": changed, "unchanged": unchanged}

    # ---- unloading -----------------------------------------------------------------------
    async def unload_model(self, name: str, reason: str = "unloaded by request", kind: str = "unloaded") -> dict:
        """Unload every replica of `name` once its requests finish; it loads again on demand."""
        if kind == "unloaded" and reason == "unloaded by request":
            self._known(name)
        self.wanted.discard(name)
        self.keep_alive_override.pop(name, None)
        ids = []
        for record in [r for r in self.replicas.values() if r.model == name]:
            ids.append(record.replica_id)
            await self._retire(record, reason, kind)
        self.states_changed()
        return {"model": name, "unloaded": ids}

    async def _retire(self, record: ReplicaRecord, reason: str, kind: str) -> None:
        """Stop sending it requests; kill it now if idle, else when its last request ends (tick)."""
        if record.state == "unloading":
            return
        if record.fetching:
            await self._cancel_transfer(record)
        record.state = "unloading"
        record.reason = reason
        self.record_event(kind, record.model, record.node_name, reason)
        log.info("%s on %s: %s", record.replica_id, record.node_name, reason)
        if record.in_flight == 0:
            await self._drop(record)

    async def _drop(self, record: ReplicaRecord) -> None:
        key = (record.model, record.index)
        if self.replicas.get(key) is record:
            del self.replicas[key]
        await self._kill(record.handle)
        self.states_changed()

    async def _finish_unloading(self) -> None:
        for record in [r for r in self.replicas.values() if r.state == "unloading" and r.in_flight == 0]:
            await self._drop(record)

    def _idle_replicas(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state == "ready" and not self.busy(r.model)]

    def _evictable(self, for_expiry: bool) -> list[Evictable]:
        out = []
        now = time.monotonic()
        for r in self._idle_replicas():
            model = self.models.get(r.model)
            keep = self.keep_alive_s(r.model)
            if model is None or (not for_expiry and (model.load == "always" or keep is None)):
                continue
            gpu, ram = self._freed_by(r)
            out.append(Evictable(r.assignment, self.last_used.get(r.model, now), keep, gpu, ram))
        return out

    async def _unload_expired(self) -> None:
        now = time.monotonic()
        done: set[str] = set()
        for e in expired(self._evictable(for_expiry=True), now):
            if e.assignment.model not in done:
                done.add(e.assignment.model)
                await self.unload_model(e.assignment.model, expiry_reason(e, now), kind="idle_unload")

    # ---- making room ---------------------------------------------------------------------
    def _make_room(self, misfits: list[tuple[str, int]], demands: dict[tuple[str, int], ModelDemand],
                   current: list[Assignment]) -> dict[tuple[str, int], RoomPlan | None]:
        """For each replica that fits nowhere or only partly on a GPU, the plan that unloads
        idle models to give it more (None: no such plan). One plan per model and tick; a model
        that fits nowhere even with every idle model gone is `cannot_place` (after a grace
        period for memory being freed)."""
        plans: dict[tuple[str, int], RoomPlan | None] = {}
        now = time.monotonic()
        evicted: set[str] = set()
        for key in misfits:
            demand = demands.get(key)
            if demand is None or any(k[0] == key[0] and p is not None for k, p in plans.items()):
                continue
            evictable = [e for e in self._evictable(for_expiry=False) if e.assignment.model not in evicted]
            plan = plan_room(self._ledger_snapshots(), demand, evictable, now, current=current)
            if isinstance(plan, Unplaced):
                made = self.room_made_at.get(key[0])
                if self.ticks >= 2 and (made is None or now - made > MAKING_ROOM_GRACE_S):
                    self.cannot_place[key[0]] = plan
                continue
            self.cannot_place.pop(key[0], None)
            if plan.victims:
                evicted |= {a.model for a in plan.victims}
                self.room_made_at[key[0]] = now
                plans[key] = plan
        return plans

    async def _evict(self, plan: RoomPlan, for_model: str) -> None:
        for victim, reason in zip(plan.victims, plan.reasons):
            if any(r.model == victim.model for r in self.replicas.values()):
                await self.unload_model(victim.model, reason, kind="evicted")

    # ---- the ledger ----------------------------------------------------------------------
    def _held_by(self, r: ReplicaRecord) -> tuple[int, int]:
        """(VRAM, RAM) bytes a replica holds that its node's measured figures do not show."""
        a = r.assignment
        declared = self._declared(r)
        loading = r.state in LOADING_STATES
        memory = r.info.get("memory") or {}
        vram = 0
        if a.gpu_index is not None and (loading or declared):
            measured = memory.get("vram_bytes")
            vram = measured if measured and not loading else a.gpu_bytes
        if loading or declared:
            ram = a.ram_bytes
        else:  # mapped weights show as available memory: count what the estimate says beyond the anonymous
            ram = max(0, a.ram_bytes - int(memory.get("rss_anon_bytes") or 0))
        return vram, ram

    def _declared(self, r: ReplicaRecord) -> bool:
        """Whether its node's figures are declared (a hardware file), so never show the replica."""
        node = self.nodes.get(r.node_id)
        return node is None or node.hardware is None or node.hardware.source == "file"

    def _declared_node(self, name: str) -> bool:
        node = next((n for n in self.nodes.values() if n.name == name and n.alive), None)
        return node is None or node.hardware is None or node.hardware.source == "file"

    def _freed_by(self, r: ReplicaRecord) -> tuple[int, int]:
        """(VRAM, RAM) bytes unloading a ready replica gives back: shown and held together."""
        a = r.assignment
        memory = r.info.get("memory") or {}
        vram = (memory.get("vram_bytes") or a.gpu_bytes) if a.gpu_index is not None else 0
        ram = a.ram_bytes if self._declared(r) else max(a.ram_bytes, int(memory.get("rss_anon_bytes") or 0))
        return vram, ram

    def _ledger_snapshots(self) -> list[NodeSnapshot]:
        """The nodes as placement sees them: measured free figures less what our replicas hold."""
        held_ram: dict[str, int] = {}
        held_vram: dict[tuple[str, int], int] = {}
        for r in [*self.replicas.values(), *self.moves.values(), *self.retiring]:
            vram, ram = self._held_by(r)
            a = r.assignment
            held_ram[a.node] = held_ram.get(a.node, 0) + ram
            if a.gpu_index is not None:
                held_vram[a.node, a.gpu_index] = held_vram.get((a.node, a.gpu_index), 0) + vram
            for h in a.helpers:  # a split's part on a helper's GPU: shown there once it loaded, if measured
                if r.state in LOADING_STATES or self._declared_node(h.node):
                    held_vram[h.node, h.gpu_index] = held_vram.get((h.node, h.gpu_index), 0) + h.gpu_bytes
        out = []
        for snapshot in self._snapshots():
            gpus = tuple(replace(g, vram_free_bytes=g.vram_free_bytes - held_vram.get((snapshot.name, g.index), 0))
                         for g in snapshot.gpus)
            out.append(replace(snapshot, ram_free_bytes=snapshot.ram_free_bytes - held_ram.get(snapshot.name, 0),
                               gpus=gpus))
        return out

    # ---- events --------------------------------------------------------------------------
    def record_event(self, kind: str, model: str, node: str | None, reason: str, **facts: object) -> None:
        """One line of the event log; `facts` (seconds, bytes) feed the metrics' histograms."""
        self.events.record(kind, model, node, reason, **facts)


# Fields that change nothing a running replica was started with: applied without a reload.
LIVE_FIELDS = {"load", "keep_alive"}


def _reload_needed(old, new) -> bool:
    return old.model_dump(exclude=LIVE_FIELDS) != new.model_dump(exclude=LIVE_FIELDS)
