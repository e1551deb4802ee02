"""Hardware files: read one (`--hardware`, `--nodes`) and find the bundled reference machines.

A hardware file is YAML or JSON in the probe's schema (`orchestrator.core.hardware.NodeHardware`).
The reference home lab of DESIGN.md (desktop, laptop-1, laptop-2) is in configs/machines/*.yaml
of a source checkout, or in orchestrator/machines/*.yaml when installed as a package.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from orchestrator.core.hardware import NodeHardware

_PACKAGE_DIR = Path(__file__).resolve().parent


class HardwareFileError(ValueError):
    """A hardware file that cannot be read or does not match the schema (message names it)."""


def default_machine_files() -> list[Path]:
    """The reference machines' hardware files: the checkout's, else the bundled copies."""
    for folder in (_PACKAGE_DIR.parent / "configs" / "machines", _PACKAGE_DIR / "seed_machines"):
        files = sorted(folder.glob("*.yaml"))
        if files:
            return files
    return []


def load_hardware_file(path: str | Path) -> NodeHardware:
    """Read and validate one hardware file; HardwareFileError says what is wrong with it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise HardwareFileError(f"cannot read hardware file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise HardwareFileError(f"{path}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HardwareFileError(f"{path}: expected a mapping of hardware fields, got {type(data).__name__}")
    try:
        return NodeHardware.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise HardwareFileError(f"{path}: {problems}") from None


def load_machines(paths: list[str | Path] | None = None) -> list[NodeHardware]:
    """The nodes of `paths`, or of the reference machines when none are given."""
    return [load_hardware_file(p) for p in (paths or default_machine_files())]
