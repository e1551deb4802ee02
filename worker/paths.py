"""Where a configured model path lands on a node (shared by the head and the nodes)."""

from __future__ import annotations

from pathlib import Path


def resolve_path(path: str, models_dir: str | Path | None = None) -> Path:
    """A config `path` on a node: absolute as given, else relative to the node's models dir."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and models_dir is not None:
        resolved = Path(models_dir).expanduser() / resolved
    return resolved
