"""Starting and joining the Ray cluster, with token authentication on.

The head and every worker run `ray start --block` as a child process that homefleet
starts and stops by PID (never `ray stop`, which would kill every Ray process on the host).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NODE_NAME_LABEL = "homefleet-node"


# A home node that vanishes (laptop lid shut, Wi-Fi gone) is declared dead after about
# period x threshold = 5 s instead of Ray's default of about 12 s. The environment wins.
HEALTH_CHECK_DEFAULTS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def health_check_env() -> dict[str, str]:
    return {key: os.environ.get(key, default) for key, default in HEALTH_CHECK_DEFAULTS.items()}


def auth_environment(token: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def lan_address() -> str:
    """This machine's address on the LAN (the one a default route leaves from)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass
class RayProcess:
    """A `ray start --block` child process (head or worker) that we own."""

    popen: subprocess.Popen
    address: str

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            # SIGTERM lets `ray start --block` stop the raylet, GCS and workers it started.
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        except ProcessLookupError:
            pass  # it ended on its own meanwhile


# `ray start`, run so that it never starts Ray Client's server (port 10001 on the node's
# address: a way into the cluster homefleet does not use). Ray starts it whenever grpcio is
# importable and has no switch to turn it off; so grpc is hidden from the `ray start`
# process alone (its raylet, GCS and workers are processes of their own and unaffected).
HIDE_GRPC = "import sys; sys.modules['grpc'] = None; "
RAY_START_WITHOUT_CLIENT_SERVER = HIDE_GRPC + "sys.argv[0] = 'ray'; from ray.scripts.scripts import main; main()"


def _ray_start(args: list[str], env_updates: dict[str, str], log_path: Path | None) -> subprocess.Popen:
    env = {**os.environ, **env_updates}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Our replicas are already stopped when we stop a node: no need for Ray's 30 s drain.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # Ray runs workers at nice 15; a replica decodes with every core in lock-step, and at
    # that priority any other program (the gateway, a browser) stalls all its threads.
    env.setdefault("RAY_worker_niceness", "0")
    # A busy laptop can take longer than Ray's 30 s to register its raylet.
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    # No log monitor: it reads every worker's log file ten times a second to pass new lines to
    # drivers, and homefleet's drivers do not take them (log_to_driver=False); the files stay.
    # That is 0.006 of a core on an idle node, a sixth of homefleet's idle use on a laptop.
    cmd = [sys.executable, "-c", RAY_START_WITHOUT_CLIENT_SERVER, "start", "--block", "--disable-usage-stats",
           "--include-log-monitor=false", *args]
    if log_path is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _labels(node_name: str | None) -> list[str]:
    return ["--labels", json.dumps({NODE_NAME_LABEL: node_name})] if node_name else []


def start_head(
    node_ip: str,
    port: int,
    token: str,
    node_env: dict[str, str],
    node_name: str | None,
    log_path: Path | None = None,
    timeout_s: float = 60.0,
    num_cpus: int | None = None,
) -> RayProcess:
    args = [
        "--head",
        f"--node-ip-address={node_ip}",
        f"--port={port}",
        "--include-dashboard=false",
        *_labels(node_name),
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    popen = _ray_start(args, {**health_check_env(), **auth_environment(token), **node_env}, log_path)
    head = RayProcess(popen, f"{node_ip}:{port}")
    try:
        _wait_for_port(node_ip, port, popen, timeout_s)
    except BaseException:  # timed out or Ctrl-C while starting: leave nothing behind
        head.stop()
        raise
    return head


def join_cluster(
    head_address: str,
    token: str,
    node_env: dict[str, str],
    node_name: str | None,
    node_ip: str | None = None,
    log_path: Path | None = None,
) -> RayProcess:
    args = [f"--address={head_address}", *_labels(node_name)]
    if node_ip:
        args.append(f"--node-ip-address={node_ip}")
    popen = _ray_start(args, {**auth_environment(token), **node_env}, log_path)
    return RayProcess(popen, head_address)


def _wait_for_port(host: str, port: int, popen: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"ray start exited with code {popen.returncode} (is port {port} already in use?)")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"Ray head did not open {host}:{port} within {timeout_s:.0f} s")


def connect(address: str, token: str, namespace: str = "homefleet") -> None:
    """Connect this process to the cluster as a driver."""
    import ray

    os.environ.update(auth_environment(token))
    ray.init(
        address=address,
        namespace=namespace,
        log_to_driver=False,
        logging_level="WARNING",
        configure_logging=True,
    )
