"""The control loop: observed nodes + desired models + running replicas -> placement ->
start/stop replicas -> replicas report measured memory -> the ledger trusts it.

Runs as an asyncio task in the orchestrator process, beside the gateway; the router reads
its replica table. Ray is reached only through `RayCluster` (orchestrator/ray_actors.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, replace

from orchestrator.cluster_view import ClusterView
from orchestrator.config import HomefleetConfig, ModelConfig
from orchestrator.controller_view import cluster_view
from orchestrator.core.hardware import GIB, NodeHardware, format_bytes
from orchestrator.core.placement import (
    Assignment,
    NodeSnapshot,
    Unplaced,
    place,
    snapshot_from_hardware,
)
from orchestrator.core.routing import reconciled_in_flight
from orchestrator.core.store_types import StoreReport, TransferProgress
from orchestrator.demand import demands_for
from orchestrator.copy_flow import TRANSFER_POLL_S, CopyFlow, transfer_text
from orchestrator.file_keeper import FileKeeper
from orchestrator.cluster_protocol import Cluster
from orchestrator.drain import Drain
from orchestrator.rebalance import Rebalance
from orchestrator.replica_faults import ReplicaFaults
from orchestrator.residency import Residency
from orchestrator.rpc_helpers import RpcHelpers
from orchestrator.wake import WakeOnLan

log = logging.getLogger(__name__)
UNLOAD_KINDS = ("unloaded", "evicted", "idle_unload")
TICK_TIMEOUT_S = 20.0  # a tick that waits longer on Ray counts as failed
STALE_REPORT_S = 30.0  # a node whose agent has not reported for this long is not placed on


@dataclass
class NodeRecord:
    node_id: str
    address: str
    is_head: bool
    name: str | None = None
    alive: bool = True
    agent: object = None
    hardware: NodeHardware | None = None
    reported_at: float | None = None
    heard_at: float | None = None  # when its last report arrived (this process's monotonic clock)
    model_files: dict[str, str] = field(default_factory=dict)  # model -> its configured path, resolved there
    store: StoreReport | None = None
    store_key: str | None = None  # bearer key of the node's file server (handed only to copying peers)
    transfers: dict[str, TransferProgress] = field(default_factory=dict)
    requests_served: int = 0
    speed_factor: float | None = None  # measured / predicted decode speed
    measured_ram_bandwidth_gbps: float | None = None  # effective, from a CPU-only replica
    draining: bool = False  # placement leaves it out (orchestrator/drain.py)
    mac: str | None = None  # for Wake-on-LAN, as its agent reported it; kept while it sleeps
    rpc_servers: list[dict] | None = None  # its llama.cpp RPC servers, as its agent last listed them
    measured_link_rtt_ms: float | None = None  # round trip from the head (orchestrator/rpc_helpers.py)

    def hardware_with_measurements(self) -> NodeHardware | None:
        """Its hardware, with what was measured where the report leaves a figure unknown."""
        if self.hardware is None:
            return None
        update = {}
        if self.measured_ram_bandwidth_gbps is not None and not self.hardware.ram_bandwidth_gbps:
            update["ram_bandwidth_gbps"] = self.measured_ram_bandwidth_gbps
        if self.measured_link_rtt_ms is not None and self.hardware.link_rtt_ms is None:
            update["link_rtt_ms"] = self.measured_link_rtt_ms
        return self.hardware.model_copy(update=update) if update else self.hardware


@dataclass
class ReplicaRecord:
    model: str
    index: int
    node_id: str
    node_name: str
    assignment: Assignment
    handle: object
    state: str = "loading"  # copying / downloading (its file), loading, ready, unloading
    reason: str | None = None
    info: dict = field(default_factory=dict)
    in_flight: int = 0
    flight_epoch: int = 0  # bumped when the count is reconciled: releases of older flights are void
    flights_changed_at: float = field(default_factory=time.monotonic)  # last acquire or release
    served: int = 0
    prompt_tokens: int = 0  # of the requests it served, from their `usage` (counted by the gateway)
    completion_tokens: int = 0
    transfer: TransferProgress | None = None  # while its file comes to the node
    transfer_started_at: float | None = None

    @property
    def replica_id(self) -> str:
        return f"{self.model}#{self.index}"

    @property
    def slots(self) -> int:
        """Requests it decodes at once: what it reports, else what it was started with."""
        return int(self.info.get("parallel") or getattr(self.assignment, "parallel", 1))

    @property
    def fetching(self) -> bool:
        return self.state in ("copying", "downloading")


class Controller(CopyFlow, Residency, Drain, ReplicaFaults, Rebalance, WakeOnLan, RpcHelpers):  # Drain first: its _may_start
    def __init__(self, config: HomefleetConfig, cluster: Cluster, interval_s: float | None = None) -> None:
        self.config = config
        self.cluster = cluster
        self.interval_s = interval_s or config.cluster.report_interval_s
        self.nodes: dict[str, NodeRecord] = {}
        self.replicas: dict[tuple[str, int], ReplicaRecord] = {}
        self.model_problems: dict[str, str] = {}  # model -> why it has no replica (failed)
        self.unplaced: dict[str, Unplaced] = {}  # model -> why no node takes it
        self.shapes: dict[str, object] = {}
        self._demand_cache: dict[str, list] = {}
        self._started_at = time.monotonic()
        self.calibrations: dict[str, object] = {}  # model -> Calibration from a dry run
        self._calibrations_pending: set[str] = set()
        self.waiting_for: list[str] = []
        self.failed_keys: dict[tuple[str, int], ReplicaRecord] = {}
        self._task: asyncio.Task | None = None
        self._loads: set[asyncio.Task] = set()
        self.ticks = 0
        self.failed_ticks = 0  # in a row: `up` exits when Ray stays unreachable
        self._waited_for_nodes = False
        self.files = FileKeeper(config, cluster, self.nodes)
        self.copy_waits: dict[str, str] = {}  # model -> why its copy cannot start yet
        self.transfer_poll_s = TRANSFER_POLL_S
        self.config_path: str | None = None  # the file `up` read; `reload` reads it again
        self._init_residency()
        self._init_faults()
        self._init_rebalance()
        self._init_drain()
        self._init_wake_on_lan()
        self._init_rpc_helpers()

    @property
    def models(self) -> dict[str, ModelConfig]:
        return {m.name: m for m in self.config.models}

    # ---- loop --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="homefleet-controller")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.tick(), TICK_TIMEOUT_S)
                self.failed_ticks = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failed_ticks += 1
                log.exception("controller tick failed")
            await self._sleep_until_woken(self.interval_s)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for task in list(self._loads):
            task.cancel()
        for record in list(self.replicas.values()):
            await self._cancel_transfer(record)
        for record in list(self.replicas.values()) + list(self.failed_keys.values()):
            await self._kill(record.handle)
        self.replicas.clear()
        for record in [*self.retiring, *self.moves.values()]:
            await self._kill(record.handle)
        self.retiring.clear()
        self.moves.clear()
        await self._stop_unused_rpc_servers()
        for node in self.nodes.values():
            if node.agent is not None:
                await self._kill(node.agent)

    async def _kill(self, handle) -> None:
        await asyncio.to_thread(self.cluster.kill, handle)  # a GCS round trip: not on the loop

    async def tick(self) -> None:
        await self._refresh_nodes()
        await self._poll_agents()
        self.files.refresh(self._copies_served_by_node())
        self.files.resolve_urls(self._spawn)
        await self._load_shapes()
        self._follow_transfers()
        await self._unload_expired()
        await self._finish_unloading()
        await self._stop_retired()
        await self._drain_step()
        self._wake_on_lan_step()
        await self._reconcile()
        # After placing: a replica found dead here is placed again next tick, once the node
        # list says whether its node is still there.
        await self._poll_replicas()
        await self._stop_unused_rpc_servers()
        await self._measure_links()
        self.ticks += 1

    # ---- observe -----------------------------------------------------------------------
    async def _refresh_nodes(self) -> None:
        seen = set()
        was_alive = {node_id for node_id, record in self.nodes.items() if record.alive}
        for node in await asyncio.to_thread(self.cluster.list_nodes):
            seen.add(node.node_id)
            record = self.nodes.get(node.node_id)
            if record is None and not node.alive:
                continue  # a dead node we never knew, or the old self of a machine that came back
            if record is None:
                record = self._returning(node)
            if record is None:
                record = self.nodes[node.node_id] = NodeRecord(node.node_id, node.address, node.is_head, node.name)
                self.node_joined()
            record.alive = node.alive
            if node.alive and record.agent is None:
                record.agent = self.cluster.start_agent(node.node_id)
        for node_id, record in self.nodes.items():
            if node_id not in seen:
                record.alive = False
            if node_id in was_alive and not record.alive:
                self._record_node_gone(record, "not seen by Ray" if node_id not in seen else "Ray reports it dead")
        live_names = {r.name for r in self.nodes.values() if r.alive}
        for key, replica in list(self.replicas.items()):
            node = self.nodes.get(replica.node_id)
            helpers_gone = [h.node for h in replica.assignment.helpers if h.node not in live_names]
            if node is None or not node.alive or helpers_gone:
                gone = replica.node_name if not helpers_gone else f"helper {', '.join(helpers_gone)}"
                log.warning("node %s is gone: %s will be placed again", gone, replica.replica_id)
                del self.replicas[key]
                await self._kill(replica.handle)

    def _record_node_gone(self, node: NodeRecord, why: str) -> None:
        name = node.name or node.node_id
        on_it = sorted(r.replica_id for r in self.replicas.values()
                       if r.node_id == node.node_id or name in (h.node for h in r.assignment.helpers))
        then = f"; {', '.join(on_it)} will be placed again" if on_it else ""
        self.record_event("node_gone", "*", name, f"{name} ({node.address}) left the cluster: {why}{then}")

    def _returning(self, node) -> NodeRecord | None:
        """A machine back under its name (a laptop waking up gets a new Ray node): its old
        record, moved to the new node id, so the fleet keeps one record per machine."""
        if not node.name:
            return None
        old = next((r for r in self.nodes.values() if r.name == node.name and not r.alive), None)
        if old is None:
            return None
        del self.nodes[old.node_id]
        log.info("%s is back (Ray node %s, was %s)", node.name, node.node_id[:12], old.node_id[:12])
        self.record_event("node_back", "*", node.name, f"{node.name} rejoined from {node.address}")
        old.node_id, old.address, old.is_head, old.agent = node.node_id, node.address, node.is_head, None
        old.hardware, old.reported_at, old.heard_at, old.transfers = None, None, None, {}
        self.nodes[node.node_id] = old
        self.node_joined()
        return old

    async def _poll_agents(self) -> None:
        paths = {m.name: m.path for m in self.config.models if m.path}
        alive = [n for n in self.nodes.values() if n.alive and n.agent is not None]
        reports = await asyncio.gather(
            *(self.cluster.report(n.agent, paths, timeout_s=max(5.0, 2 * self.interval_s)) for n in alive),
            return_exceptions=True,
        )
        for node, report in zip(alive, reports):
            if isinstance(report, BaseException):
                log.debug("no report from %s: %s", node.name or node.node_id, report)
                continue
            node.name = report["name"]
            node.address = report["address"]
            node.hardware = NodeHardware.model_validate(report["hardware"])
            node.model_files = report["model_files"]
            node.reported_at = report["reported_at"]
            node.heard_at = time.monotonic()
            node.store = StoreReport.model_validate(report["store"]) if report.get("store") else None
            node.store_key = report.get("store_key")
            node.mac = report.get("mac") or node.mac
            node.transfers = {t["transfer_id"]: TransferProgress.model_validate(t) for t in report.get("transfers", ())}
            node.rpc_servers = report.get("rpc_servers")

    async def _poll_replicas(self) -> None:
        """Measured memory of each ready replica, so the ledger and the views trust real figures;
        the load progress of each loading one."""
        ready = [r for r in self.replicas.values() if r.state in ("ready", "loading", "unloading")]
        infos = await asyncio.gather(
            *(self.cluster.info(r.handle, timeout_s=max(5.0, 2 * self.interval_s)) for r in [*ready, *self.retiring]),
            return_exceptions=True,
        )
        # Retiring replicas (moved away from) stop once idle: their count must be true too.
        for replica, info in zip(self.retiring, infos[len(ready):]):
            if not isinstance(info, BaseException):
                replica.info = info
                self._reconcile_flights(replica)
        for replica, info in zip(ready, infos):
            if isinstance(info, BaseException):
                if self.cluster.is_dead_actor_error(info) and replica.state != "loading":
                    await self.replica_died(replica, f"replica process died: {type(info).__name__}")
                continue
            if replica.state == "loading":
                replica.info["load_progress"] = info.get("load_progress")
                continue
            replica.info = info
            self._calibrate_speed(replica)
            self._reconcile_flights(replica)

    def _reconcile_flights(self, replica: ReplicaRecord) -> None:
        """A slot that a lost path never released is given back (orchestrator/core/routing.py)."""
        quiet = time.monotonic() - replica.flights_changed_at
        corrected = reconciled_in_flight(replica.in_flight, replica.info.get("requests_in_progress"), quiet)
        if corrected is None:
            return
        why = f"the gateway counted {replica.in_flight} request(s) in flight that the replica does not hold"
        log.warning("%s: %s; count reset to %d", replica.replica_id, why, corrected)
        self.record_event("reconciled", replica.model, replica.node_name, why)
        replica.in_flight = corrected
        replica.flight_epoch += 1
        replica.flights_changed_at = time.monotonic()

    def _calibrate_speed(self, replica: ReplicaRecord) -> None:
        """A node's decode speed as its replicas measure it, against the bandwidth prediction."""
        from orchestrator.fit import calibrate_speed

        measured = replica.info.get("decode_tokens_per_s")
        node = self.nodes.get(replica.node_id)
        shape = self.shapes.get(replica.model)
        if not measured or node is None or node.hardware is None or shape is None:
            return
        if replica.assignment.helpers:
            return self._calibrate_split(replica)
        if node.hardware.source != "probe":
            return  # a declared machine: this host's speed says nothing about it
        a = replica.assignment
        gpu = next((g for g in node.hardware.gpus if g.index == a.gpu_index), None)
        calibrated, factor = calibrate_speed(node.hardware, shape, a.gpu_layers, gpu, measured)
        node.speed_factor = round(factor, 3)
        if calibrated.ram_bandwidth_gbps and not node.hardware.ram_bandwidth_gbps:
            node.measured_ram_bandwidth_gbps = calibrated.ram_bandwidth_gbps

    async def _load_shapes(self) -> None:
        """Read each model's GGUF header once: on a node that holds the file (here if it is
        here), else the first megabytes of its URL."""
        reported = [n for n in self.nodes.values() if n.alive and n.hardware is not None]
        for model in self.config.models:
            if model.name in self.shapes or not reported:
                continue
            if not model.path and not model.url:
                self.model_problems[model.name] = (
                    f"no `path` or `url`: the catalog entry {model.catalog!r} is for `homefleet plan` and `fit` only"
                )
                continue
            holders = self.files.holders(model.name)
            holder = next((n for n in reported if n.name in holders), None)
            if holder is None:
                missing = self.files.missing_reason(model)
                if missing is not None:
                    self.model_problems[model.name] = missing
                elif self.files.url_usable(model):
                    await self._load_shape_from_url(model)
                continue
            path = holders[holder.name].path
            try:
                if os.path.isfile(path):
                    from orchestrator.core.model_shape import shape_from_gguf

                    shape = await asyncio.to_thread(shape_from_gguf, path)
                else:
                    shape = await self.cluster.read_shape(holder.agent, path)
            except Exception as exc:
                self.model_problems[model.name] = _shape_problem(model, exc)
                continue
            self.shapes[model.name] = shape
            self.model_problems.pop(model.name, None)
            self._calibrations_pending.add(model.name)
            self._spawn(self._calibrate(model, shape, holder, path))

    async def _load_shape_from_url(self, model: ModelConfig) -> None:
        """No node holds the file yet: size it from its header, read over HTTP (a few MiB)."""
        from orchestrator.core.model_shape import shape_from_header
        from worker.sources import read_remote_gguf_header

        try:
            header = await asyncio.to_thread(read_remote_gguf_header, self.files.resolved[model.name])
            self.shapes[model.name] = shape_from_header(header, model.name)
            self.model_problems.pop(model.name, None)
        except Exception as exc:
            self.model_problems[model.name] = f"cannot read the GGUF header at {model.url}: {exc}"

    async def _calibrate(self, model: ModelConfig, shape, holder: NodeRecord, path: str) -> None:
        """Ask llama.cpp itself (a dry run on a node with the file) how far off the analytic estimate is."""
        from orchestrator.calibration import calibration_from_dry_run
        from orchestrator.core.estimate import EstimateOptions

        real_gpu = bool(holder.hardware and holder.hardware.gpus and holder.hardware.source == "probe")
        gpu_layers = shape.n_layers + 1 if real_gpu else 0
        opts = EstimateOptions(n_ctx=model.context, kv_type=model.kv_type, flash_attn=bool(model.flash_attn),
                               n_slots=model.parallel or 1)
        try:
            result = await self.cluster.dry_run(holder.agent, path, model.context, gpu_layers,
                                                model.kv_type, model.flash_attn, n_slots=model.parallel or 1)
            calibration = calibration_from_dry_run(shape, opts, gpu_layers, result, holder.name or "?", real_gpu)
        except Exception as exc:
            log.info("no dry run for %s: %s", model.name, exc)
            calibration = None
        if calibration is not None:
            self.calibrations[model.name] = calibration
            self._demand_cache.pop(model.name, None)
        self._calibrations_pending.discard(model.name)

    # ---- decide and act ----------------------------------------------------------------
    def _snapshots(self) -> list[NodeSnapshot]:
        """The nodes placement may use: alive, with a recent report, one per name (a second
        live node under a name in use is left out, with a warning, until the first leaves)."""
        out, names = [], set()
        stale_after = max(STALE_REPORT_S, 10 * self.interval_s)
        now = time.monotonic()
        for node in self.nodes.values():
            if not (node.alive and node.hardware is not None and node.name) or node.draining:
                continue
            if node.heard_at is None or now - node.heard_at > stale_after:
                continue  # its agent has not answered for a while: do not place on old figures
            if node.hardware.name in names:
                log.warning("two live nodes are named %s; %s (%s) is left out", node.hardware.name,
                            node.node_id[:12], node.address)
                continue
            names.add(node.hardware.name)
            held = {model for model in self.files.files if node.name in self.files.holders(model)}
            disk_free = node.store.disk_free_bytes if node.store is not None else None
            out.append(snapshot_from_hardware(node.hardware, held, disk_free))
        return out

    def _demands(self, model: ModelConfig) -> list:
        """A model's demands, built once: need(k) is cached inside them across ticks."""
        if model.name in self._calibrations_pending:
            return []  # a few seconds: place with llama.cpp's own figure, not a guess
        if model.name not in self._demand_cache:
            demands = demands_for(
                [model],
                shape_loader=lambda m: self.shapes[m.name],
                on_problem=lambda name, why: self.model_problems.__setitem__(name, why),
            )
            calibration = self.calibrations.get(model.name)
            if calibration is not None:
                demands = [d.scaled(calibration.factor) for d in demands]
            file_bytes = self.files.size_bytes(model.name)
            if not file_bytes:
                return demands  # size known soon (a holder's report, or the URL): not cached until then
            keep_free = int(self.config.cluster.keep_free_disk_gib * GIB)
            demands = [replace(d, file_bytes=file_bytes, keep_free_disk_bytes=keep_free) for d in demands]
            self._demand_cache[model.name] = demands
        return self._demand_cache[model.name]

    def _missing_nodes(self) -> list[str]:
        """Expected nodes not reported yet, while the start-up grace period lasts: once they all
        reported (or the time ran out) the wait is over for good, so a node that leaves later
        never holds placement."""
        cluster = self.config.cluster
        if self._waited_for_nodes or time.monotonic() - self._started_at > cluster.wait_for_nodes_s:
            self._waited_for_nodes = True
            return []
        reported = {n.name for n in self.nodes.values() if n.alive and n.hardware is not None}
        missing = [name for name in cluster.wait_for_nodes if name not in reported]
        self._waited_for_nodes = not missing
        return missing

    async def _reconcile(self) -> None:
        missing = self._missing_nodes()
        if missing:
            self.waiting_for = missing
            return
        self.waiting_for = []
        wanted = [m for m in self.config.models if m.name in self.shapes and m.name in self.wanted]
        demands = [d for m in wanted for d in self._demands(m)]
        self._forgive_failures()
        demands = [d for d in demands if self._may_start((d.model, d.replica))]
        current = [r.assignment for r in self.replicas.values()]
        result = place(self._ledger_snapshots(), demands, current=current, splitter=self._splitter())
        self.unplaced = {}
        for miss in result.unplaced:
            self.unplaced.setdefault(miss.model, miss)
        self.copy_waits = {}
        running = {(a.model, a.replica) for a in current}
        # A new replica that would not run whole on a GPU may get there by unloading idle models.
        second_best = [a for a in result.assignments if (a.model, a.replica) not in running and a.kind != "gpu"]
        for assignment in result.assignments:
            if assignment not in second_best:
                self._start(assignment)
        misfits = [(a.model, a.replica) for a in second_best] + [(m.model, m.replica) for m in result.unplaced]
        if misfits:
            by_key = {(d.model, d.replica): d for d in demands}
            chosen = {(a.model, a.replica): a for a in second_best}
            for key, plan in self._make_room(misfits, by_key, current).items():
                split = chosen.get(key) is not None and chosen[key].kind == "rpc"
                if plan is None or (split and plan.assignment.kind != "gpu"):
                    continue  # no room to make, or less than the split across machines gives
                await self._evict(plan, key[0])
                self.unplaced.pop(key[0], None)
                chosen[key] = plan.assignment
            for assignment in chosen.values():
                self._start(assignment)
        self._rebalance(demands)
        for name in list(self.cannot_place):
            if name not in self.wanted or name not in self.unplaced:
                self.cannot_place.pop(name, None)
            elif self.models[name].load == "on_demand" and not self.busy(name):
                self.wanted.discard(name)  # nobody waits for it any more: not loaded, not pending

    def _start(self, assignment: Assignment) -> None:
        """Start the replica `assignment` places (copying its file there first if needed)."""
        key = (assignment.model, assignment.replica)
        by_name = {n.name: n for n in self.nodes.values() if n.alive}
        if key in self.replicas or assignment.node not in by_name:
            return
        model, node = self.models[assignment.model], by_name[assignment.node]
        if assignment.helpers:
            self._split_placed(assignment)
        held = self.files.holders(model.name).get(node.name)
        if held is not None:
            self._start_replica(model, assignment, node, held.path)
        else:
            self._start_copy(model, assignment, node)
        if key in self.replicas:  # a copy that cannot start yet is placed again next tick
            self.record_event("placed", model.name, node.name, _placement_reason(assignment, held is not None))

    def _start_replica(self, model: ModelConfig, assignment: Assignment, node: NodeRecord, path: str,
                       transfer: TransferProgress | None = None) -> None:
        record = self._new_replica(model, assignment, node, path, transfer)
        self.replicas[(model.name, assignment.replica)] = record
        log.info("starting %s on %s (%s, %d/%d layers on GPU)", record.replica_id, record.node_name,
                 assignment.kind, assignment.gpu_layers, assignment.n_layers)
        self._spawn(self._load(record))

    def _new_replica(self, model: ModelConfig, assignment: Assignment, node: NodeRecord, path: str,
                     transfer: TransferProgress | None = None) -> ReplicaRecord:
        """A replica process started on `node` (not yet loading, not yet in the table)."""
        settings = {
            "model_name": model.name,
            "path": path,
            "n_ctx": model.context,
            "n_gpu_layers": assignment.gpu_layers,
            "n_threads": model.n_threads,
            "chat_format": model.chat_format,
            "flash_attn": model.flash_attn,
            "kv_type": model.kv_type,
            "embedding": model.embedding,
            "parallel": 1 if model.embedding else assignment.parallel,
            "gpu_index": assignment.gpu_index,
            **self._helper_settings(assignment),
        }
        record = ReplicaRecord(
            model=model.name,
            index=assignment.replica,
            node_id=node.node_id,
            node_name=node.name or node.node_id,
            assignment=assignment,
            handle=None,
            transfer=transfer,
        )
        try:
            record.handle = self.cluster.start_replica(node.node_id, record.replica_id, settings)
        finally:
            self._adopt_rpc_uses((model.name, assignment.replica), record if record.handle is not None else None)
        return record

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load(self, record: ReplicaRecord) -> None:
        key = (record.model, record.index)
        if record.assignment.helpers:
            refused = await self._start_helpers(record)
            if refused is not None:
                if self.replicas.get(key) is record:
                    del self.replicas[key]
                await self._kill(record.handle)
                await self._split_refused(record, refused)
                return
        try:
            info = await self.cluster.load(record.handle, self.config.gateway.load_timeout_s)
        except asyncio.TimeoutError:
            if self.replicas.get(key) is not record:
                return
            del self.replicas[key]
            await self._kill(record.handle)
            await self._crashed(record, f"the load did not finish within {self.config.gateway.load_timeout_s:g} s")
            return
        except Exception as exc:
            if self.replicas.get(key) is not record:
                return  # its node left while it loaded; a new replica has taken its place
            if self.cluster.is_node_gone_error(exc):  # not the model's fault: place it again
                log.warning("%s could not start on %s (%s); placing it again", record.replica_id,
                            record.node_name, type(exc).__name__)
                del self.replicas[key]
                return
            del self.replicas[key]
            await self._kill(record.handle)
            await self._crashed(record, f"replica process died while loading: {type(exc).__name__}")
            return
        if self.replicas.get(key) is not record:
            return
        record.info = info
        if record.state == "unloading":  # unloaded while it loaded: the tick stops it
            return
        record.state = info.get("state", "failed")
        record.reason = info.get("reason")
        self.last_used[record.model] = time.monotonic()
        self.states_changed()
        if record.state == "ready":
            self.record_event("loaded", record.model, record.node_name,
                              f"{record.replica_id} ready in {info.get('load_seconds', 0):.1f} s",
                              seconds=info.get("load_seconds"))
        if record.state == "failed":
            # Stays failed with its reason; the other models keep serving.
            log.warning("%s failed: %s", record.replica_id, record.reason)
            self.replicas.pop(key, None)
            self._load_failed(key, record)
            await self._kill(record.handle)

    # ---- read by the router and the views ----------------------------------------------
    def ready_replicas(self, model: str) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.model == model and r.state == "ready"]

    def model_state(self, name: str) -> tuple[str, str | None]:
        replicas = [r for r in self.replicas.values() if r.model == name]
        failed = [r for (m, _), r in self.failed_keys.items() if m == name]
        if any(r.state == "ready" for r in replicas):
            return "ready", None
        if any(r.state == "loading" for r in replicas):
            loading = next(r for r in replicas if r.state == "loading")
            progress = loading.info.get("load_progress")
            return "loading", (f"{int(100 * progress)}% " if progress is not None else "") + f"on {loading.node_name}"
        fetching = [r for r in replicas if r.fetching]
        if fetching:
            return fetching[0].state, transfer_text(fetching[0])
        if failed:
            return "failed", failed[0].reason
        held = self._hold_reason(name)
        if held is not None:
            return "pending", held
        if any(r.state == "unloading" for r in replicas):
            return "unloading", next(r.reason for r in replicas if r.state == "unloading")
        if name not in self.wanted and name not in self.model_problems:
            last = next((e for e in reversed(self.events) if e["model"] == name and e["kind"] in UNLOAD_KINDS), None)
            return "not_loaded", last["reason"] if last else "loads on its first request"
        if self.waiting_for:
            return "pending", "waiting for nodes to join: " + ", ".join(self.waiting_for)
        if name in self.model_problems:
            return "failed", self.model_problems[name]
        if name in self.unplaced:
            return "pending", "not placed: " + self.unplaced[name].summary
        if name in self.copy_waits:
            return "pending", self.copy_waits[name]
        return "pending", "waiting for node reports" if self.ticks < 2 else "waiting"

    def retry_after_s(self, name: str) -> int | None:
        """For a 503 while a model's file travels: about when the copy ends (1-60 s)."""
        etas = [r.transfer.eta_s for r in self.replicas.values()
                if r.model == name and r.fetching and r.transfer and r.transfer.eta_s is not None]
        return max(1, min(60, int(min(etas)) + 1)) if etas else None

    def view(self) -> ClusterView:
        return cluster_view(self)

    def estimate_source(self, model: str) -> str | None:
        if model in self.calibrations:
            return self.calibrations[model].source
        return "analytic (GGUF header)" if model in self.shapes else None

    def unplaced_reason(self, model: str) -> str | None:
        miss = self.unplaced.get(model)
        return "not placed: " + miss.summary if miss else None


def _placement_reason(a: Assignment, holds_file: bool) -> str:
    """'gemma#0 on desktop: whole on GPU 0 (1.2 GiB VRAM), 2 slots; the node holds its file'."""
    if a.kind == "gpu":
        where = f"whole on GPU {a.gpu_index} ({format_bytes(a.gpu_bytes)} VRAM)"
    elif a.kind == "rpc":
        where = f"across machines, {a.describe()}: {a.split_why}"
    elif a.kind == "split":
        where = (f"{a.gpu_layers}/{a.n_layers} layers on GPU {a.gpu_index} ({format_bytes(a.gpu_bytes)} VRAM), "
                 f"the rest in RAM ({format_bytes(a.ram_bytes)})")
    else:
        where = f"on the CPU ({format_bytes(a.ram_bytes)} RAM)"
    slots = f"{a.parallel} slot{'s' if a.parallel != 1 else ''}"
    file = "the node holds its file" if holds_file else "its file is copied there first"
    return f"{a.model}#{a.replica} on {a.node}: {where}, {slots}; the best fit the placement rules found; {file}"


def _shape_problem(model: ModelConfig, exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {model.path}"
    return f"cannot read {model.path or model.catalog}: {text}"
