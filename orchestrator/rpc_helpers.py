"""Splits across machines, run (issue 13). A mixin of the Controller, beside CopyFlow and
Residency.

- Placement weighs a split through the `splitter` built here each tick
  (orchestrator/split_planner.py), unless `cluster.rpc_split` is off.
- A split's replica runs on its main node; each helper node runs llama.cpp's RPC server
  (worker/rpc_servers.py, through its agent) on its cluster address and a port counted up
  from `cluster.rpc_port`. The servers start before the replica loads and stop once the
  replica is gone, whatever ended it (a sweep each tick), so none is left listening unused.
- A server that cannot start: the replica is not loaded, the split is refused for the model
  for a while, with the reason, and placement takes the best single node.
- A helper that stops answering (asleep, cut off): llama.cpp aborts the replica at its next
  token; the crash path places the model again, and splits leave that node out for a while.
- A split replica's measured decode speed against its prediction calibrates later
  predictions for splits across the same machines; each node's round trip, measured from
  the head, prices its hops where its hardware file declares none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from orchestrator.core.placement import Assignment, Splitter
from orchestrator.core.rpc_split import split_key
from orchestrator.demand import estimate_options
from orchestrator.split_planner import make_splitter

if TYPE_CHECKING:
    from orchestrator.controller import NodeRecord, ReplicaRecord

log = logging.getLogger(__name__)
SPLIT_REFUSED_S = 600.0  # a split whose RPC server could not start is not tried again sooner
HELPER_LOST_S = 120.0  # a helper that stopped answering takes part in no split for this long
LINK_MEASURE_S = 60.0  # how often each node's round trip from the head is measured


@dataclass
class RpcServerUse:
    """An RPC server a split's replica uses on a helper node."""

    key: tuple[str, int]  # the replica's (model, index)
    node: str
    port: int
    gpu_index: int
    record: ReplicaRecord | None = None  # set once the replica exists
    started: bool = False


class RpcHelpers:
    def _init_rpc_helpers(self) -> None:
        self.rpc_uses: dict[tuple[str, int], RpcServerUse] = {}  # (helper node, port) -> its use
        self.split_refused: dict[str, tuple[float, str]] = {}  # model -> (until, why)
        self.helpers_lost: dict[str, float] = {}  # node name -> excluded from splits until
        self.split_speed_factors: dict[str, float] = {}  # split_key -> measured / predicted
        self._planned_factors: dict[tuple[str, int], float] = {}  # replica -> the factor its prediction had
        self._split_nodes_seen: frozenset[str] = frozenset()
        self._links_measured_at = -LINK_MEASURE_S

    # ---- plan ---------------------------------------------------------------------------
    def _splitter(self) -> Splitter | None:
        if not self.config.cluster.rpc_split:
            return None
        now = time.monotonic()
        live = frozenset(n.name for n in self.nodes.values() if n.alive and n.name)
        if live != self._split_nodes_seen:  # a machine joined or came back: refusals may be over
            back = live - self._split_nodes_seen
            self.helpers_lost = {n: until for n, until in self.helpers_lost.items() if n not in back}
            self.split_refused, self._split_nodes_seen = {}, live
        self.split_refused = {m: v for m, v in self.split_refused.items() if v[0] > now}
        self.helpers_lost = {n: until for n, until in self.helpers_lost.items() if until > now}
        hardware = {n.name: n.hardware_with_measurements() for n in self.nodes.values()
                    if n.alive and n.hardware is not None and n.name and n.name not in self.helpers_lost}
        speed = {n.name: n.speed_factor for n in self.nodes.values() if n.name and n.speed_factor}
        return make_splitter(self.shapes, lambda model, slots: estimate_options(self.models[model], slots), hardware,
                             speed, self.split_speed_factors, {m: why for m, (_, why) in self.split_refused.items()},
                             {m: c.factor for m, c in self.calibrations.items()})

    # ---- run ----------------------------------------------------------------------------
    def _helper_settings(self, assignment: Assignment) -> dict:
        """The replica's `rpc_servers` and `rpc_layers`: a port reserved on each helper node."""
        if not assignment.helpers:
            return {}
        by_name = {n.name: n for n in self.nodes.values() if n.alive}
        endpoints, layers = [], []
        for part in assignment.helpers:
            node = by_name[part.node]
            taken = {port for (name, port) in self.rpc_uses if name == part.node}
            port = next(p for p in range(self.config.cluster.rpc_port, 65536) if p not in taken)
            self.rpc_uses[(part.node, port)] = RpcServerUse((assignment.model, assignment.replica), part.node, port,
                                                            part.gpu_index)
            endpoints.append(f"{node.address}:{port}")
            layers.append(part.layers)
        return {"rpc_servers": tuple(endpoints), "rpc_layers": tuple(layers)}

    def _split_placed(self, assignment: Assignment) -> None:
        """Placement took a split: remember the measured factor its prediction carries."""
        key = (assignment.model, assignment.replica)
        self._planned_factors[key] = self.split_speed_factors.get(split_key(assignment.nodes), 1.0)

    def _adopt_rpc_uses(self, key: tuple[str, int], record: ReplicaRecord | None) -> None:
        """The ports `_helper_settings` reserved belong to `record` now (None: it was not
        created; the reservations go)."""
        for port_key, use in list(self.rpc_uses.items()):
            if use.key == key and use.record is None:
                if record is None:
                    del self.rpc_uses[port_key]
                else:
                    use.record = record

    async def _start_helpers(self, record: ReplicaRecord) -> str | None:
        """Start the RPC servers `record`'s split uses; why not, if one cannot start (the split
        is then refused for the model a while; a helper whose agent does not answer is left
        out of every split a while instead)."""
        uses = [u for u in self.rpc_uses.values() if u.record is record]
        by_name = {n.name: n for n in self.nodes.values() if n.alive}
        for use in uses:
            node = by_name.get(use.node)
            answer = None
            if node is not None and node.agent is not None:
                try:
                    answer = await self.cluster.start_rpc_server(node.agent, use.port, use.gpu_index)
                except Exception as exc:
                    log.warning("%s: the agent on %s did not start its RPC server: %s", record.replica_id, use.node, exc)
            if answer is None:
                self.helpers_lost[use.node] = time.monotonic() + HELPER_LOST_S
                return f"helper {use.node} does not answer"
            if "error" in answer:
                self.split_refused[record.model] = (time.monotonic() + SPLIT_REFUSED_S, f"{use.node}: {answer['error']}")
                return f"{use.node}: {answer['error']}"
            use.started = True
            if self.rpc_uses.get((use.node, use.port)) is not use:  # the replica went while it started
                await self._stop_rpc_server(use.node, use.port)
                return f"{record.replica_id} is gone"
            log.info("%s: RPC server on %s at %s", record.replica_id, use.node, answer.get("endpoint"))
        return None

    async def _split_refused(self, record: ReplicaRecord, why: str) -> None:
        """A helper's server could not start: no replica; placed again next tick."""
        self.record_event("split_refused", record.model, record.node_name,
                          f"{record.replica_id}: split across machines not used: {why}; placing it again")
        await self._stop_unused_rpc_servers()

    async def _stop_unused_rpc_servers(self) -> None:
        """Stop each RPC server whose replica is gone (the sweep, each tick), and any a node
        lists that no replica uses (a start that timed out here yet went on there); a replica
        whose helper's server died is ended (llama.cpp would abort at its next token anyway)."""
        by_name = {n.name: n for n in self.nodes.values() if n.alive}
        for (name, port), use in list(self.rpc_uses.items()):
            if use.record is not None and self.replicas.get(use.key) is use.record:
                if use.started and not _server_alive(by_name.get(name), port):
                    await self.replica_died(use.record, f"the RPC server on helper {name} (port {port}) is gone")
                continue
            if use.record is not None and (use.record in self.retiring or self.moves.get(use.key) is use.record):
                continue  # moved away from, it serves its last requests; or a move's replica, loading
            if self.rpc_uses.pop((name, port), None) is not None:  # another sweep may have taken it meanwhile
                await self._stop_rpc_server(name, port)
        for node in by_name.values():
            for server in node.rpc_servers or ():
                if (node.name, server.get("port")) not in self.rpc_uses:
                    await self._stop_rpc_server(node.name, server["port"])

    async def _stop_rpc_server(self, name: str, port: int) -> None:
        node = next((n for n in self.nodes.values() if n.alive and n.name == name), None)
        if node is None or node.agent is None:
            return  # its agent is gone: its servers went with it
        try:
            await self.cluster.stop_rpc_server(node.agent, port)
        except Exception as exc:
            log.info("could not stop the RPC server on %s:%d: %s", name, port, exc)
        if node.rpc_servers:  # not listed again until its next report
            node.rpc_servers = [s for s in node.rpc_servers if s.get("port") != port]

    async def _lost_helper(self, replica: ReplicaRecord) -> str | None:
        """The first helper node of a split replica that no longer answers (it is left out of
        splits for a while), or None."""
        by_name = {n.name: n for n in self.nodes.values()}
        for part in replica.assignment.helpers:
            node = by_name.get(part.node)
            if node is None or not await self._node_answers(node.node_id):
                self.helpers_lost[part.node] = time.monotonic() + HELPER_LOST_S
                return part.node
        return None

    # ---- measured, then trusted -------------------------------------------------------
    async def _measure_links(self) -> None:
        """Each node's round trip from the head, every LINK_MEASURE_S: the time of a TCP
        connect to its file server (one SYN and its answer), the median of a few. The split's
        network cost uses it for a node whose hardware file declares no `link_rtt_ms` (the
        head stands in for the split's main node: one home LAN)."""
        now = time.monotonic()
        if not self.config.cluster.rpc_split or now - self._links_measured_at < LINK_MEASURE_S:
            return
        self._links_measured_at = now
        nodes = [n for n in self.nodes.values() if n.alive and n.store is not None and n.store.server_url]
        self._spawn(self._measure(nodes))  # a machine that does not answer takes seconds: not in the tick

    async def _measure(self, nodes: list[NodeRecord]) -> None:
        async def one(node: NodeRecord) -> None:
            url = urlsplit(node.store.server_url)
            if url.hostname and url.port:
                rtt = await asyncio.to_thread(self.cluster.round_trip_ms, url.hostname, url.port)
                node.measured_link_rtt_ms = rtt if rtt is not None else node.measured_link_rtt_ms

        await asyncio.gather(*(one(n) for n in nodes))

    def _calibrate_split(self, replica: ReplicaRecord) -> None:
        a = replica.assignment
        measured = replica.info.get("decode_tokens_per_s")
        if not measured or not a.tokens_per_s:
            return
        if any(self._declared_node(name) for name in a.nodes):
            return  # a declared machine: this host's speed says nothing about it
        planned = self._planned_factors.get((replica.model, replica.index), 1.0)  # already in a.tokens_per_s
        self.split_speed_factors[split_key(a.nodes)] = round(planned * measured / a.tokens_per_s, 3)


def _server_alive(node: NodeRecord | None, port: int) -> bool:
    """Whether the node's last report shows its RPC server on `port` running (True when the
    report says nothing of it: an agent that does not list servers)."""
    listing = node.rpc_servers if node is not None else None
    if listing is None:
        return True
    entry = next((s for s in listing if s.get("port") == port), None)
    return entry is None or bool(entry.get("alive"))
