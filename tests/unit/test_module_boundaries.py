"""Boundaries between the parts: the controller reads its cluster through the `Cluster`
Protocol (orchestrator/cluster_protocol.py), which the Ray shell and the unit tests' fake
both satisfy, and a worker imports nothing of the head but the pure core."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from orchestrator.cluster_protocol import Cluster
from orchestrator.ray_actors import RayCluster
from tests.unit.test_controller import FakeCluster

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_METHODS = sorted(
    name for name, value in vars(Cluster).items() if not name.startswith("_") and inspect.isfunction(value)
)


def call_shape(cls: type, name: str) -> tuple[bool, list[tuple[str, object, object]]]:
    """(is async, [(name, kind, default)] of the parameters a caller passes), whether the
    method is plain or static."""
    method = inspect.getattr_static(cls, name)
    function = method.__func__ if isinstance(method, staticmethod) else method
    parameters = list(inspect.signature(function).parameters.values())
    if not isinstance(method, staticmethod):
        parameters = parameters[1:]  # self
    return inspect.iscoroutinefunction(function), [(p.name, p.kind, p.default) for p in parameters]


def test_the_protocol_lists_every_method_the_controller_calls_on_its_cluster():
    called = set()
    for path in [*(ROOT / "orchestrator").glob("*.py"), *(ROOT / "orchestrator/gateway").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            # self.cluster.X(...) and controller.cluster.X(...); config.cluster.X is the config's section
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "cluster" and not _is_config(node.value.value)):
                called.add(node.attr)
    assert called <= set(PROTOCOL_METHODS), sorted(called - set(PROTOCOL_METHODS))
    assert set(PROTOCOL_METHODS) <= called, f"not called, so not needed: {sorted(set(PROTOCOL_METHODS) - called)}"


def _is_config(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "config") or (isinstance(node, ast.Name) and node.id == "config")


@pytest.mark.parametrize("implementation", [RayCluster, FakeCluster], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_ray_cluster_and_the_fake_cluster_satisfy_the_cluster_protocol(implementation, method):
    assert hasattr(implementation, method), f"{implementation.__name__} has no {method}"
    is_async, parameters = call_shape(implementation, method)
    expected_async, expected_parameters = call_shape(Cluster, method)
    assert is_async == expected_async, f"{implementation.__name__}.{method}: async is {is_async}"
    assert parameters == expected_parameters


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # `from orchestrator import config`
    return out


def test_worker_imports_nothing_of_the_head_but_the_pure_core():
    offending = {}
    for path in sorted((ROOT / "worker").rglob("*.py")):
        head = sorted(m for m in imported_modules(path)
                      if m.split(".")[0] == "orchestrator" and m.split(".")[:2] != ["orchestrator", "core"]
                      and m != "orchestrator")
        if head:
            offending[str(path.relative_to(ROOT))] = head
    assert offending == {}
