"""Which nodes hold a model's file, which copies can be trusted, where a copy comes from,
and which copies nobody uses any more. Pure: agents' store reports in, decisions out.

A node "holds" a model when it has a file it can load: the file at the configured `path`
(the user put it there), or a copy in its store whose SHA-256 is the expected one. The
expected SHA-256 is the config's pin; else the one the model's URL publishes (Hugging Face
gives it for LFS files); else that of the user's own file at the configured path. Only a
file whose hash is known to match is a source for copies ("verified").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.core.store_types import StoredFile, StoreReport


@dataclass(frozen=True)
class NodeFiles:
    """One node's files as its agent reported them."""

    name: str
    alive: bool = True
    store: StoreReport | None = None
    configured: Mapping[str, str] = field(default_factory=dict)  # model -> resolved path of its configured file
    busy: int = 0  # transfers it serves now: copies prefer the least busy source

    def file_at(self, path: str) -> StoredFile | None:
        if self.store is None:
            return None
        return next((f for f in self.store.files if f.path == path), None)


@dataclass(frozen=True)
class FileWanted:
    model: str
    file_name: str | None  # its name in a store
    pinned_sha256: str | None = None
    published_sha256: str | None = None  # from the URL's metadata
    published_size: int | None = None


@dataclass(frozen=True)
class ModelFiles:
    expected_sha256: str | None
    holders: dict[str, StoredFile]  # node -> the file it would load
    verified: dict[str, StoredFile]  # node -> a file whose hash is known to match: copy sources
    size_bytes: int | None
    mismatches: dict[str, str]  # node -> why its file is not used, when a pin rules it out

    def mismatch_summary(self) -> str:
        return "; ".join(f"{node}: {why}" for node, why in sorted(self.mismatches.items()))


def locate(wanted: FileWanted, nodes: Sequence[NodeFiles]) -> ModelFiles:
    """Holders and verified copies of one model's file across `nodes` (head first)."""
    alive = [n for n in nodes if n.alive and n.store is not None]
    expected = wanted.pinned_sha256 or wanted.published_sha256 or _origin_sha256(wanted, alive)
    holders: dict[str, StoredFile] = {}
    verified: dict[str, StoredFile] = {}
    mismatches: dict[str, str] = {}
    pinned = wanted.pinned_sha256 or wanted.published_sha256
    for node in alive:
        user_file = node.file_at(node.configured[wanted.model]) if wanted.model in node.configured else None
        copies = [
            f for f in node.store.files
            if f is not user_file and expected is not None and f.sha256 == expected
        ]
        if user_file is not None:
            matches = user_file.sha256 is not None and user_file.sha256 == expected
            if matches:
                verified[node.name] = holders[node.name] = user_file
            elif pinned is None:
                holders[node.name] = user_file  # the user's own file: trusted as it is
            elif user_file.sha256 is not None:
                mismatches[node.name] = (
                    f"{user_file.path} has sha256 {user_file.sha256[:12]}..., expected {pinned[:12]}..."
                )
        if node.name not in verified and copies:
            verified[node.name] = copies[0]
            holders.setdefault(node.name, copies[0])
    sizes = [f.size_bytes for f in (*verified.values(), *holders.values())]
    size = sizes[0] if sizes else wanted.published_size
    return ModelFiles(expected, holders, verified, size, mismatches)


def _origin_sha256(wanted: FileWanted, nodes: Sequence[NodeFiles]) -> str | None:
    """The hash of the user's own file at the configured path (first node that knows it)."""
    for node in nodes:
        path = node.configured.get(wanted.model)
        user_file = node.file_at(path) if path else None
        if user_file is not None and user_file.sha256 and not user_file.copied_by_homefleet:
            return user_file.sha256
    return None


def copy_sources(files: ModelFiles, target: str, nodes: Sequence[NodeFiles]) -> list[tuple[NodeFiles, StoredFile]]:
    """Nodes with a verified copy the target can fetch from, least busy first."""
    by_name = {n.name: n for n in nodes}
    out = [
        (by_name[name], f) for name, f in files.verified.items()
        if name != target and name in by_name and by_name[name].alive
        and by_name[name].store is not None and by_name[name].store.server_url
    ]
    return sorted(out, key=lambda pair: (pair[0].busy, pair[0].name))


def unused_copies(nodes: Sequence[NodeFiles], files_by_model: Mapping[str, ModelFiles]) -> list[tuple[str, StoredFile]]:
    """(node, file) for every file homefleet copied that no configured model uses."""
    used_hashes = {f.expected_sha256 for f in files_by_model.values() if f.expected_sha256}
    used_paths = {(node, f.path) for mf in files_by_model.values() for node, f in mf.holders.items()}
    out = []
    for node in nodes:
        if node.store is None:
            continue
        for f in node.store.files:
            if not f.copied_by_homefleet or (node.name, f.path) in used_paths:
                continue
            if f.sha256 is None or f.sha256 in used_hashes:
                continue  # still hashing, or the same bytes as a model's file: kept
            out.append((node.name, f))
    return out
