"""`ray start` as homefleet runs it never starts Ray Client's server (issue 11: keys)."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.ray_cluster import HIDE_GRPC, RAY_START_WITHOUT_CLIENT_SERVER

ASK_RAY = ("from ray._private.utils import get_ray_client_dependency_error as missing; "
           "print('client server' if missing() is None else 'none')")


def _ray_would_start(tmp_path, prefix: str) -> str:
    """What `ray start --head` would start, in a process where grpcio imports (a stand-in)."""
    (tmp_path / "grpc").mkdir(exist_ok=True)
    (tmp_path / "grpc" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", prefix + ASK_RAY], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_with_grpcio_installed_ray_would_start_its_client_server(tmp_path):
    assert _ray_would_start(tmp_path, "") == "client server"


def test_the_ray_start_homefleet_runs_hides_grpcio_so_no_client_server_starts(tmp_path):
    assert RAY_START_WITHOUT_CLIENT_SERVER.startswith(HIDE_GRPC)
    assert _ray_would_start(tmp_path, HIDE_GRPC) == "none"
