"""A node's model store: the GGUF files in its models dir, their SHA-256 and the free disk.

Each file's hash is computed once, in the background, and kept beside it in a hidden
sidecar (`.NAME.homefleet.json`) that is trusted while the file's size and mtime are
unchanged. Files a homefleet transfer wrote are marked there, so that pruning removes
only copies, never a file the user put in place.

A file is reached by its name only: `path_of` refuses anything with a separator, a
leading dot, or a symlink that leaves the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from pathlib import Path

from orchestrator.core.model_source import alternate_name, is_store_name
from orchestrator.core.store_types import StoredFile, StoreReport

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".gguf",)
SIDECAR_SUFFIX = ".homefleet.json"
HASH_CHUNK_BYTES = 8 << 20


class StoreError(ValueError):
    """A name that is not a file of this store; the message says why."""


def default_models_dir() -> Path:
    """~/.local/share/homefleet/models, or under $XDG_DATA_HOME."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "homefleet" / "models"


def sha256_of(path: str | Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{SIDECAR_SUFFIX}")


def _read_sidecar(path: Path) -> dict:
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_sidecar(path: Path, data: dict) -> bool:
    target = sidecar_path(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
        return True
    except OSError:
        return False  # a read-only directory: the hash stays in memory only


class ModelStore:
    def __init__(self, root: str | Path, declared_disk_free_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.declared_disk_free_bytes = declared_disk_free_bytes
        self._memory: dict[str, dict] = {}  # path -> sidecar data, where no sidecar can be written
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._meta_lock = threading.RLock()  # the hasher and a commit may describe one file at once
        self._bytes_at_start = self._stored_bytes() if declared_disk_free_bytes is not None else 0
        self._queue: queue.Queue[Path] = queue.Queue()
        self._hasher = threading.Thread(target=self._hash_loop, name="store-hasher", daemon=True)
        self._hasher.start()

    # ---- names and paths -----------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The file `name` of this store; StoreError unless it is a plain name of a file inside it."""
        if not is_store_name(name):
            raise StoreError(f"{name!r} is not a file name of this store")
        path = self.root / name
        real = Path(os.path.realpath(path))
        if real.parent != self.root and self.root not in real.parents:
            raise StoreError(f"{name} leaves the store")
        if not real.is_file():
            raise StoreError(f"{name} is not in the store")
        return path

    def contains(self, path: str | Path) -> bool:
        real = Path(os.path.realpath(path))
        return self.root in real.parents

    def partial_path(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    # ---- inventory -------------------------------------------------------------------
    def disk_usage(self) -> tuple[int | None, int | None]:
        """(free, total) bytes of the store's volume. A declared free figure (a node run as
        another machine) wins, less what the store has grown by since it started."""
        declared = self._declared_free()
        try:
            usage = shutil.disk_usage(self.root)
        except OSError:
            return declared, None
        return (usage.free if declared is None else declared), usage.total

    def _declared_free(self) -> int | None:
        if self.declared_disk_free_bytes is None:
            return None
        grown = max(0, self._stored_bytes() - self._bytes_at_start)
        return max(0, self.declared_disk_free_bytes - grown)

    def _stored_bytes(self) -> int:
        total = 0
        for p in (*self.files(), *self.root.glob(".*.partial")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def files(self) -> list[Path]:
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        return [
            p for p in entries
            if not p.name.startswith(".") and p.name.lower().endswith(MODEL_SUFFIXES) and p.is_file()
        ]

    def describe(self, path: Path, in_store: bool = True) -> StoredFile | None:
        """The file's size and known hash (None while hashing: queued for the background)."""
        try:
            st = path.stat()
        except OSError:
            return None
        meta = self._meta(path)
        fresh = meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns
        if not fresh:
            self._enqueue(path)
        return StoredFile(
            name=path.name,
            path=str(path),
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=meta.get("sha256") if fresh else None,
            copied_by_homefleet=bool(meta.get("copied_by_homefleet")) and fresh,
            in_store=in_store,
        )

    def report(self, extra_paths: list[str] = (), server_url: str | None = None) -> StoreReport:
        """Every model file in the store, and files at configured paths outside it."""
        files = [f for f in (self.describe(p) for p in self.files()) if f is not None]
        seen = {f.path for f in files}
        for extra in extra_paths:
            path = Path(extra)
            if str(path) in seen or not path.is_file():
                continue
            described = self.describe(path, in_store=self.contains(path))
            if described is not None:
                files.append(described)
                seen.add(str(path))
        free, total = self.disk_usage()
        return StoreReport(models_dir=str(self.root), disk_free_bytes=free, disk_total_bytes=total, files=files,
                           server_url=server_url)

    def hash_now(self, path: str | Path) -> str:
        """Hash `path` here and now (and cache it); the background thread does the same."""
        path = Path(path)
        before = path.stat()
        digest = sha256_of(path)
        after = path.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise OSError(f"{path} changed while it was hashed")
        with self._meta_lock:  # read-modify-write: a commit may be marking the same file a copy
            meta = self._meta(path)
            fresh = meta.get("size") == after.st_size and meta.get("mtime_ns") == after.st_mtime_ns
            self._remember(path, {"size": after.st_size, "mtime_ns": after.st_mtime_ns, "sha256": digest,
                                  "copied_by_homefleet": bool(meta.get("copied_by_homefleet")) and fresh})
        return digest

    # ---- what transfers and pruning do -------------------------------------------------
    def commit(self, partial: Path, name: str, sha256: str) -> StoredFile:
        """Move a verified partial file into place under `name`, never over another file.

        The same file already there: the partial is dropped. A different file there: the
        copy takes `alternate_name` (name-<sha12>.gguf).
        """
        for candidate in (name, alternate_name(name, sha256)):
            final = self.root / candidate
            existing = self.describe(final) if final.exists() else None
            if existing is not None:
                known = existing.sha256 or self.hash_now(final)
                if known == sha256:
                    partial.unlink(missing_ok=True)
                    return self.describe(final)
                continue
            try:
                os.link(partial, final)  # fails if the name was taken meanwhile: nothing is overwritten
            except FileExistsError:
                continue
            partial.unlink(missing_ok=True)
            st = final.stat()
            self._remember(final, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                   "copied_by_homefleet": True})
            return self.describe(final)
        raise StoreError(f"{name} and {alternate_name(name, sha256)} both hold other files")

    def remove_copy(self, name: str) -> int:
        """Delete a file that a homefleet transfer wrote; returns the bytes freed."""
        path = self.path_of(name)
        described = self.describe(path)
        if described is None or not described.copied_by_homefleet:
            raise StoreError(f"{name} was not copied here by homefleet; it is left alone")
        path.unlink()
        sidecar_path(path).unlink(missing_ok=True)
        self._memory.pop(str(path), None)
        return described.size_bytes

    # ---- internals -------------------------------------------------------------------
    def _meta(self, path: Path) -> dict:
        return self._memory.get(str(path)) or _read_sidecar(path)

    def _remember(self, path: Path, data: dict) -> None:
        with self._meta_lock:
            if not _write_sidecar(path, data):
                self._memory[str(path)] = data
            else:
                self._memory.pop(str(path), None)

    def _enqueue(self, path: Path) -> None:
        with self._lock:
            if str(path) in self._pending:
                return
            self._pending.add(str(path))
        self._queue.put(path)

    def _hash_loop(self) -> None:
        while True:
            path = self._queue.get()
            try:
                self.hash_now(path)
            except OSError as exc:
                log.info("cannot hash %s yet: %s", path, exc)
            finally:
                with self._lock:
                    self._pending.discard(str(path))

    def wait_hashed(self, timeout_s: float = 60.0) -> None:
        """Block until the background hasher is idle (tests, `homefleet models` on one node)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return
            time.sleep(0.02)
        raise TimeoutError("still hashing")
