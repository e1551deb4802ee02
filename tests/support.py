"""Helpers for tests that start real servers: free ports, `homefleet up` as a child process
stopped by PID, waiting for models to be ready."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import yaml

TEST_RAY_TOKEN = "homefleet-test-token-0123456789abcdef"
# Ray rewrites 127.0.0.1 to the LAN address; any other loopback address stays on loopback.
LOOPBACK_NODE_IP = "127.0.0.2"


# Ports for the servers tests start: above Ray's worker ports (10002-19999) and below the
# kernel's ephemeral range, from which the OS gives every client socket and every port Ray
# picks at random. A port the OS handed out (bind to 0) could be taken by one of Ray's
# processes before the server binds it (seen: a gateway's port taken while Ray started).
TEST_PORTS = range(20000, 32768)
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on every address now, never handed out before in this process."""
    candidates = range(TEST_PORTS.start, min(TEST_PORTS.stop, _ephemeral_low()))
    if len(candidates) > 1000:
        for port in random.sample(candidates, 500):
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range here: let the OS choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TEST_RAY_TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("HOMEFLEET_API_KEY", None)
    env.update(extra)
    return env


def homefleet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def joining_token_file(folder: Path) -> Path:
    """The test token in a 0600 file, for `homefleet join --token-file` (never on a command line)."""
    path = folder / "test_ray_token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(TEST_RAY_TOKEN + "\n")
    return path


def write_config(path: Path, models: list[dict], **sections) -> Path:
    path.write_text(yaml.safe_dump({"models": models, **sections}))
    return path


class RunningUp:
    def __init__(self, popen: subprocess.Popen, url: str, log_path: Path) -> None:
        self.popen = popen
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cluster(self) -> dict:
        return httpx.get(f"{self.url}/api/cluster", timeout=10).json()

    def wait_for_models(self, states: dict[str, set[str]], timeout_s: float = 180) -> dict:
        """Wait until each model is in one of its wanted states; return the cluster view."""
        deadline = time.monotonic() + timeout_s
        view = {}
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"homefleet up exited with {self.popen.returncode}:\n{self.log()}")
            try:
                view = self.cluster()
                got = {m["name"]: m["state"] for m in view["models"]}
                if all(got.get(name) in wanted for name, wanted in states.items()):
                    return view
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"models not in {states} after {timeout_s}s: {view}\n{self.log()[-4000:]}")

    def wait_for_nodes(self, names: list[str], timeout_s: float = 120) -> dict:
        """Wait until each named node reports as alive; return the cluster view."""
        deadline = time.monotonic() + timeout_s
        view = {}
        while time.monotonic() < deadline:
            try:
                view = self.cluster()
                alive = {n["name"] for n in view["nodes"] if n["state"] == "alive"}
                if set(names) <= alive:
                    return view
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"nodes {names} not alive after {timeout_s}s: {view.get('nodes')}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C, as a user would press it; returns the exit code."""
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        procs = self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        for proc in procs:  # anything left behind, by PID
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@contextmanager
def homefleet_up(tmp_path: Path, *args: str, env: dict | None = None, wait_http: bool = True,
                 token_file: bool = True):
    """`homefleet up` as a child process. Its token file is kept in tmp_path (`--token-file`
    among `args` names another), never in the user's own ~/.config/homefleet. `token_file`
    False: no such flag (a checkout from before it, run by a benchmark)."""
    port, ray_port = free_port(), free_port()
    log_path = tmp_path / f"up-{port}.log"
    token_args = [] if "--token-file" in args or not token_file else ["--token-file", str(tmp_path / "ray_token")]
    command = homefleet_command(
        "up", "--port", str(port), "--ray-port", str(ray_port), "--node-ip-address", LOOPBACK_NODE_IP,
        *token_args, *args
    )
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(command, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT)
    running = RunningUp(popen, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait_http:
            _wait_http(running, 120)
        yield running
    finally:
        running.kill()


def _wait_http(running: RunningUp, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running.popen.poll() is not None:
            raise RuntimeError(f"homefleet up exited with {running.popen.returncode}:\n{running.log()}")
        try:
            if httpx.get(f"{running.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(f"gateway not up after {timeout_s}s:\n{running.log()}")


@contextmanager
def homefleet_join(tmp_path: Path, head_address: str, name: str, node_ip: str, *args: str, env: dict | None = None):
    """`homefleet join --token-file` as a child process; stopped (Ctrl-C, then by PID) on exit."""
    log_path = tmp_path / f"join-{name}.log"
    command = homefleet_command(
        "join", head_address, "--token-file", str(joining_token_file(tmp_path)), "--name", name,
        "--node-ip-address", node_ip, *args
    )
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(command, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT)
    running = RunningUp(popen, "", log_path)
    try:
        yield running
    finally:
        running.kill()


def ray_address_of(running: RunningUp) -> str:
    """The head's Ray address, from the line `homefleet up` prints for joining."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in running.log().splitlines():
            if "homefleet join " in line:
                return line.split("homefleet join ", 1)[1].split()[0]
        time.sleep(0.2)
    raise TimeoutError(running.log())


GIB = 1024**3


def declared_machine(tmp_path: Path, name: str, seed: str, vram_free: float, ram_available: float, **extra) -> str:
    """A seed machine's hardware file with its live use declared (scaled to this test box);
    `extra` sets other fields (e.g. disk_free_bytes). Returns the file's path."""
    hardware = yaml.safe_load(open(seed))
    hardware["name"] = name
    hardware["ram_available_bytes"] = int(ram_available)
    if hardware.get("gpus"):
        hardware["gpus"][0]["vram_free_bytes"] = int(vram_free)
    hardware.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(hardware))
    return str(path)


def replica_of(view: dict, model: str) -> dict:
    return next(m for m in view["models"] if m["name"] == model)["replicas"][0]


def model_of(view: dict, model: str) -> dict:
    return next(m for m in view["models"] if m["name"] == model)


def node_of(view: dict, name: str) -> dict:
    return next(n for n in view["nodes"] if n["name"] == name)
