"""The controller's part in moving model files: a replica whose node lacks its file is
`copying` (or `downloading`) until the node's agent has fetched and verified it, then it
loads from the node's own copy. Progress comes with each agent report.

A mixin of the Controller (orchestrator/controller.py): it reads and writes the same
replica table, and the decisions are FileKeeper's and the pure core's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from orchestrator.core.hardware import format_bytes
from orchestrator.core.store_types import TransferProgress

if TYPE_CHECKING:
    from orchestrator.config import ModelConfig
    from orchestrator.controller import NodeRecord, ReplicaRecord
    from orchestrator.core.placement import Assignment

log = logging.getLogger("orchestrator.controller")


class CopyFlow:
    def _start_copy(self, model: ModelConfig, assignment: Assignment, node: NodeRecord) -> None:
        spec = self.files.transfer_spec(model, node.name)
        if isinstance(spec, str):
            self.copy_waits[model.name] = spec  # e.g. the source is still hashing: next tick
            return
        from orchestrator.controller import ReplicaRecord  # the controller's own record type

        kind = spec.sources[0].kind
        record = ReplicaRecord(
            model=model.name, index=assignment.replica, node_id=node.node_id, node_name=node.name or node.node_id,
            assignment=assignment, handle=None, state="copying" if kind == "copy" else "downloading",
            transfer=TransferProgress(transfer_id=spec.transfer_id, name=spec.name, state="queued", kind=kind,
                                      source=spec.sources[0].label, total_bytes=spec.size_bytes),
            transfer_started_at=time.monotonic(),
        )
        self.replicas[(model.name, assignment.replica)] = record
        log.info("%s: %s %s to %s from %s", record.replica_id, "copying" if kind == "copy" else "downloading",
                 spec.name, record.node_name, ", ".join(s.label for s in spec.sources))
        self._spawn(self._begin_transfer(record, node, spec))

    async def _begin_transfer(self, record: ReplicaRecord, node: NodeRecord, spec) -> None:
        try:
            progress = await self.cluster.start_transfer(node.agent, spec.as_dict())
        except Exception as exc:
            progress = {"transfer_id": spec.transfer_id, "name": spec.name, "state": "failed",
                        "error": f"the agent on {record.node_name} did not start the copy: {type(exc).__name__}"}
        if self.replicas.get((record.model, record.index)) is record:
            self._apply_transfer(record, TransferProgress.model_validate(progress))
        await self._watch_transfer(record, node)

    async def _watch_transfer(self, record: ReplicaRecord, node: NodeRecord) -> None:
        """Between the node's reports, ask it how the copy goes: the replica starts loading
        as soon as the file is verified, not at the next report (`report_interval_s` later),
        and the `copied` event's seconds are the copy's own. The reports still count."""
        key = (record.model, record.index)
        while True:
            await asyncio.sleep(self.transfer_poll_s)
            if self.replicas.get(key) is not record or not record.fetching or not node.alive or node.agent is None:
                return
            try:
                progress = await self.cluster.transfer(node.agent, record.transfer.transfer_id)
            except Exception:  # a slow or restarting agent: its reports carry the copy on
                continue
            if progress is not None and self.replicas.get(key) is record and record.fetching:
                self._apply_transfer(record, TransferProgress.model_validate(progress))

    def _follow_transfers(self) -> None:
        """Copies in flight: progress from the target's report; when done, load the replica."""
        for record in [r for r in self.replicas.values() if r.fetching]:
            node = self.nodes.get(record.node_id)
            progress = node.transfers.get(record.transfer.transfer_id) if node is not None else None
            if progress is not None:
                self._apply_transfer(record, progress)
            elif time.monotonic() - (record.transfer_started_at or 0) > TRANSFER_LOST_S:
                log.warning("%s: the copy to %s was lost (agent restarted?); placing again", record.replica_id,
                            record.node_name)
                self.replicas.pop((record.model, record.index), None)

    def _apply_transfer(self, record: ReplicaRecord, progress: TransferProgress) -> None:
        record.transfer = progress
        key = (record.model, record.index)
        if progress.state == "done":
            node = self.nodes.get(record.node_id)
            if node is None or not node.alive:
                return
            log.info("%s: %s is on %s (sha256 %s...)", record.replica_id, progress.name, record.node_name,
                     (progress.sha256 or "")[:12])
            self._record_copied(record, progress)
            self.replicas.pop(key, None)
            self._start_replica(self.models[record.model], record.assignment, node, progress.path, transfer=progress)
        elif progress.state == "failed":
            record.state = "failed"
            record.reason = f"copying {progress.name} to {record.node_name} failed: {progress.error}"
            log.warning("%s: %s", record.replica_id, record.reason)
            self.replicas.pop(key, None)
            self._load_failed(key, record)  # tried again after a cool-down, or when the nodes change
        elif progress.state == "cancelled":
            self.replicas.pop(key, None)
        else:
            record.state = "copying" if progress.kind == "copy" else "downloading"

    def _record_copied(self, record: ReplicaRecord, progress: TransferProgress) -> None:
        seconds = time.monotonic() - record.transfer_started_at if record.transfer_started_at else None
        size = progress.total_bytes or progress.bytes_done
        verb = "downloaded" if progress.kind == "download" else "copied"
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        rate = f" ({format_bytes(size / seconds)}/s)" if seconds else ""
        sha = f", sha256 {progress.sha256[:12]}..." if progress.sha256 else ""
        self.record_event("copied", record.model, record.node_name,
                          f"{progress.name} {verb} to {record.node_name} from {progress.source or '?'}: "
                          f"{format_bytes(size)}{took}{rate}{sha}", seconds=seconds, bytes=size, method=progress.kind)

    def _copies_served_by_node(self) -> Counter:
        """How many copies each node is the source of now (copies prefer the least busy)."""
        return Counter(r.transfer.source for r in self.replicas.values() if r.fetching and r.transfer)

    async def _cancel_transfer(self, record: ReplicaRecord) -> None:
        node = self.nodes.get(record.node_id)
        if record.fetching and record.transfer and node is not None and node.alive and node.agent is not None:
            try:
                await self.cluster.cancel_transfer(node.agent, record.transfer.transfer_id)
            except Exception:
                pass  # the node is going away: its transfer goes with it


TRANSFER_LOST_S = 60.0  # a copy its node no longer reports (its agent restarted) is placed again
TRANSFER_POLL_S = 0.5  # how often a copy in flight is asked after, between the node's reports


def transfer_text(record: ReplicaRecord) -> str:
    """'to laptop-1 from desktop: 45% of 1.2 GiB at 112 MiB/s, about 6 s left'."""
    t = record.transfer
    if t is None:
        return f"to {record.node_name}"
    text = f"to {record.node_name} from {t.source}"
    if t.state == "verifying":
        return text + ": verifying sha256"
    if t.percent is not None:
        text += f": {t.percent:.0f}% of {format_bytes(t.total_bytes)}"
    if t.rate_bytes_per_s:
        text += f" at {format_bytes(t.rate_bytes_per_s)}/s"
    if t.eta_s is not None:
        text += f", about {t.eta_s:.0f} s left"
    return text


