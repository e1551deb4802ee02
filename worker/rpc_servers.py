"""The llama.cpp RPC servers a node's agent runs for splits across machines (issue 13).

One child process (worker/rpc_server.py) per split that uses this node's GPU, bound to the
node's cluster address and a port the head chose from the config; started when the split is
placed and stopped when it ends, so that none is left listening unused (llama.cpp's RPC has
no authentication). A server that cannot start answers with the reason, and the head does
not use the split.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0


@dataclass
class _Running:
    endpoint: str
    gpu_index: int | None
    process: subprocess.Popen
    log_path: Path


class RpcServers:
    def __init__(self, address: str, log_dir: str | None = None) -> None:
        self.address = address
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()

    def start(self, port: int, gpu_index: int | None, threads: int | None = None) -> dict:
        """{"endpoint": "HOST:PORT"} once it listens, or {"error": why}. Idempotent for a port
        whose server still runs with the same GPU."""
        with self._lock:
            running = self._running.get(port)
            if running is not None and running.process.poll() is None:
                if running.gpu_index == gpu_index:
                    return {"endpoint": running.endpoint}
                return {"error": f"port {port} serves GPU {running.gpu_index} already"}
            endpoint = f"{self.address}:{port}"
            busy = _port_taken(self.address, port)
            if busy is not None:
                return {"error": f"llama.cpp's RPC server cannot listen on {endpoint}: {busy}"}
            log_path = self.log_dir / f"homefleet-rpc-{self.address}-{port}.log"  # one per node and port
            command = [sys.executable, "-m", "worker.rpc_server", "--endpoint", endpoint, "--parent-pid", str(os.getpid())]
            command += ["--gpu", str(gpu_index)] if gpu_index is not None else []
            command += ["--threads", str(threads)] if threads else []
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._running[port] = _Running(endpoint, gpu_index, process, log_path)
        error = _wait_listening(self.address, port, process, START_TIMEOUT_S)
        if error is not None:
            self.stop(port)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return {"error": f"llama.cpp's RPC server on {endpoint} did not start: {error}"
                             + (f" ({' / '.join(tail)})" if tail else "")}
        return {"endpoint": endpoint}

    def stop(self, port: int) -> bool:
        with self._lock:
            running = self._running.pop(port, None)
        if running is None:
            return False
        running.process.terminate()
        try:
            running.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()
        return True

    def stop_all(self) -> None:
        for port in list(self._running):
            self.stop(port)

    def listing(self) -> list[dict]:
        """What runs now (for the node's report): endpoint, GPU, and whether it is alive."""
        with self._lock:
            return [{"port": port, "endpoint": r.endpoint, "gpu_index": r.gpu_index,
                     "alive": r.process.poll() is None} for port, r in sorted(self._running.items())]


def _port_taken(host: str, port: int) -> str | None:
    """Why `port` cannot be ours (another program listens there), or None; checked before the
    start, as a connect would otherwise reach that program and pass for our server."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _wait_listening(host: str, port: int, process: subprocess.Popen, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"it exited with code {process.returncode}"
        try:
            socket.create_connection((host, port), timeout=1).close()
            return None
        except OSError:
            time.sleep(0.2)
    return f"not listening after {timeout_s:.0f} s"
