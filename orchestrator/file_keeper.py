"""The controller's hands for model files: where each model's file is, whether a copy can
be trusted, where a copy to a chosen node comes from, `pull` and `prune`.

Decisions are the pure functions of orchestrator/core/file_locality.py; this module feeds
them the agents' reports, resolves model URLs (Hugging Face through huggingface_hub) off
the event loop, and turns a decision into a TransferSpec that the target node's agent runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import quote

from orchestrator.config import HomefleetConfig, ModelConfig
from orchestrator.core.file_locality import FileWanted, ModelFiles, NodeFiles, copy_sources, locate, unused_copies
from orchestrator.core.hardware import GIB, MIB
from orchestrator.core.model_source import HfSource, HttpSource, SourceError, StoreSource, parse_source, parse_url
from worker.transfer import Source, TransferSpec

if TYPE_CHECKING:
    from orchestrator.controller import NodeRecord

log = logging.getLogger(__name__)
URL_RETRY_S = 30.0


class PullError(ValueError):
    """A pull that cannot start; `status` is the HTTP status the gateway answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FileKeeper:
    def __init__(self, config: HomefleetConfig, cluster, nodes: dict[str, NodeRecord]) -> None:
        self.config = config
        self.cluster = cluster
        self.nodes = nodes  # the controller's node table, read only
        self.files: dict[str, ModelFiles] = {}
        self.resolved: dict[str, object] = {}  # model -> worker.sources.ResolvedSource
        self.url_problems: dict[str, str] = {}
        self._resolving: dict[str, float] = {}  # model -> when the last try started
        self.pulls: dict[str, str] = {}  # transfer id -> node id, for `homefleet pull`

    # ---- observe ---------------------------------------------------------------------
    def node_files(self, busy: Counter | None = None) -> list[NodeFiles]:
        """The alive nodes' files, the head first (its files are the usual origin)."""
        out = []
        for node in sorted(self.nodes.values(), key=lambda n: (not n.is_head, n.name or "")):
            if node.name and node.store is not None:
                out.append(NodeFiles(node.name, node.alive, node.store, dict(node.model_files),
                                     (busy or Counter())[node.name]))
        return out

    def refresh(self, busy: Counter | None = None) -> None:
        nodes = self.node_files(busy)
        self.files = {m.name: locate(self._wanted(m), nodes) for m in self.config.models if m.path or m.url}

    def _wanted(self, model: ModelConfig) -> FileWanted:
        resolved = self.resolved.get(model.name)
        return FileWanted(
            model=model.name,
            file_name=model.file_name,
            pinned_sha256=model.sha256,
            published_sha256=getattr(resolved, "sha256", None),
            published_size=getattr(resolved, "size_bytes", None),
        )

    def resolve_urls(self, spawn) -> None:
        """Learn each model URL's size and published SHA-256 (in the background)."""
        now = time.monotonic()
        for model in self.config.models:
            if not model.url or model.name in self.resolved:
                continue
            started = self._resolving.get(model.name)
            if started is not None and now - started < URL_RETRY_S:
                continue
            self._resolving[model.name] = now
            spawn(self._resolve(model))

    async def _resolve(self, model: ModelConfig) -> None:
        from worker.sources import resolve_source

        try:
            resolved = await asyncio.to_thread(resolve_source, parse_url(model.url))
        except (SourceError, OSError, ValueError) as exc:
            self.url_problems[model.name] = f"cannot reach {model.url}: {exc}"
            return
        if model.sha256 and resolved.sha256 and resolved.sha256 != model.sha256:
            self.url_problems[model.name] = (
                f"{model.url} publishes sha256 {resolved.sha256[:12]}..., the config pins {model.sha256[:12]}..."
            )
        else:
            self.url_problems.pop(model.name, None)
        self.resolved[model.name] = resolved

    def url_usable(self, model: ModelConfig) -> bool:
        return model.name in self.resolved and model.name not in self.url_problems

    # ---- what placement and loading need -----------------------------------------------
    def holders(self, model: str) -> dict:
        files = self.files.get(model)
        return files.holders if files else {}

    def size_bytes(self, model: str) -> int:
        files = self.files.get(model)
        return (files.size_bytes or 0) if files else 0

    def missing_reason(self, model: ModelConfig) -> str | None:
        """Why no node can get the file (None: some node holds it, or it can be fetched)."""
        files = self.files.get(model.name)
        if files is not None and files.holders:
            return None
        if model.url:
            if self.url_usable(model):
                return None
            return self.url_problems.get(model.name)  # None while the URL is being resolved
        where = f"file not found on any node: {model.path}"
        if files is not None and files.mismatches:
            where = f"no node holds a copy with the pinned sha256 ({files.mismatch_summary()})"
        return where + " (and the model has no `url` to download it from)"

    def transfer_spec(self, model: ModelConfig, target: str) -> TransferSpec | str:
        """How the node `target` gets the model's file; a string says why it cannot (yet)."""
        files = self.files.get(model.name)
        if files is None:
            return "waiting for the nodes' file reports"
        if files.expected_sha256 is None and files.holders:
            holders = ", ".join(sorted(files.holders))
            return f"waiting for {holders} to compute the file's sha256"
        sources = [self._peer_source(node, f) for node, f in copy_sources(files, target, self.node_files())]
        if model.url and self.url_usable(model):
            sources.append(self.resolved[model.name].as_transfer_source())
        if not sources:
            return self.missing_reason(model) or f"no source for {model.file_name}"
        cluster = self.config.cluster
        return TransferSpec(
            transfer_id=uuid.uuid4().hex,
            name=model.file_name,
            sources=tuple(sources),
            sha256=files.expected_sha256,
            size_bytes=files.size_bytes,
            keep_free_disk_bytes=int(cluster.keep_free_disk_gib * GIB),
            max_attempts=cluster.copy_attempts,
            rate_limit_bytes_per_s=int(cluster.copy_rate_limit_mib_s * MIB) if cluster.copy_rate_limit_mib_s else None,
        )

    def _peer_source(self, node: NodeFiles, stored) -> Source:
        record = next(r for r in self.nodes.values() if r.name == node.name)
        return Source(
            label=node.name,
            url=f"{node.store.server_url}/files/{quote(stored.name)}",
            headers={"Authorization": f"Bearer {record.store_key}"},
            kind="copy",
        )

    # ---- pull and prune ----------------------------------------------------------------
    async def pull(self, source_text: str, node_name: str | None, sha256: str | None) -> dict:
        """Start fetching a file into a node's store ahead of time; returns the transfer's id."""
        try:
            source = parse_source(source_text)
        except SourceError as exc:
            raise PullError(str(exc)) from None
        target = self._target(node_name)
        if isinstance(source, StoreSource):
            spec = self._copy_by_name(source.name, target.name, sha256)
        else:
            spec = await self._download(source, sha256)
        await self.cluster.start_transfer(target.agent, spec.as_dict())
        self.pulls[spec.transfer_id] = target.node_id
        return {"transfer_id": spec.transfer_id, "node": target.name, "name": spec.name}

    def _target(self, node_name: str | None) -> NodeRecord:
        alive = [n for n in self.nodes.values() if n.alive and n.agent is not None and n.name]
        if node_name is None:
            head = next((n for n in alive if n.is_head), None)
            if head is None:
                raise PullError("no head node to pull to; name one with --node", 404)
            return head
        target = next((n for n in alive if n.name == node_name), None)
        if target is None:
            names = ", ".join(sorted(n.name for n in alive)) or "none"
            raise PullError(f"no live node named {node_name!r} (live nodes: {names})", 404)
        return target

    def _copy_by_name(self, name: str, target: str, sha256: str | None) -> TransferSpec:
        holders = []
        for node in self.node_files():
            stored = node.store.by_name().get(name) if node.alive else None
            if node.name == target and stored is not None:
                raise PullError(f"{target} already holds {name}", 409)
            if stored is not None and stored.sha256 and (sha256 is None or stored.sha256 == sha256):
                holders.append((node, stored))
        if not holders:
            raise PullError(f"no node holds a hashed copy of {name}" + (f" with sha256 {sha256}" if sha256 else ""), 404)
        holders.sort(key=lambda pair: (pair[0].busy, pair[0].name))
        stored = holders[0][1]
        return TransferSpec(uuid.uuid4().hex, name, tuple(self._peer_source(n, s) for n, s in holders),
                            sha256=stored.sha256, size_bytes=stored.size_bytes,
                            keep_free_disk_bytes=int(self.config.cluster.keep_free_disk_gib * GIB))

    async def _download(self, source: HttpSource | HfSource, sha256: str | None) -> TransferSpec:
        from worker.sources import resolve_source

        try:
            resolved = await asyncio.to_thread(resolve_source, source)
        except (SourceError, OSError, ValueError) as exc:
            raise PullError(f"cannot reach {source}: {exc}", 502) from None
        if sha256 and resolved.sha256 and sha256 != resolved.sha256:
            raise PullError(f"{source} publishes sha256 {resolved.sha256}, not {sha256}", 409)
        return TransferSpec(uuid.uuid4().hex, source.file_name, (resolved.as_transfer_source(),),
                            sha256=sha256 or resolved.sha256, size_bytes=resolved.size_bytes,
                            keep_free_disk_bytes=int(self.config.cluster.keep_free_disk_gib * GIB),
                            max_attempts=self.config.cluster.copy_attempts)

    async def transfer(self, transfer_id: str) -> dict | None:
        """A transfer's progress, asked of its node now (not the last report)."""
        node = self.nodes.get(self.pulls.get(transfer_id, ""))
        candidates = [node] if node is not None else [n for n in self.nodes.values() if n.alive and n.agent]
        for candidate in candidates:
            try:
                progress = await self.cluster.transfer(candidate.agent, transfer_id)
            except Exception:
                continue
            if progress is not None:
                return {**progress, "node": candidate.name}
        return None

    async def prune(self, dry_run: bool) -> list[dict]:
        """Remove the copies homefleet made that no configured model uses."""
        out = []
        by_name = {n.name: n for n in self.nodes.values() if n.alive and n.agent is not None}
        for node_name, stored in unused_copies(self.node_files(), self.files):
            entry = {"node": node_name, "name": stored.name, "size_bytes": stored.size_bytes}
            if not dry_run and node_name in by_name:
                result = await self.cluster.remove_copy(by_name[node_name].agent, stored.name)
                entry["removed"] = "error" not in result
                if "error" in result:
                    entry["error"] = result["error"]
            out.append(entry)
        return out
