"""Two network namespaces ("hosts") joined by a veth pair, for tests and benchmarks that
send traffic between addresses of their own (needs root and `ip`). Both ends of the pair
are made inside the namespaces: no interface ever appears on the host.

Also what tests that run homefleet inside such namespaces share: starting a process in a
namespace, an HTTP request sent from inside one, and stopping all of it by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


class VethHosts:
    """Namespaces `first` and `second` (named after a tag and this process), addresses
    `first_ip` and `second_ip` on one /`prefix` network."""

    def __init__(self, tag: str, first_ip: str, second_ip: str, prefix: int = 24) -> None:
        pid = os.getpid()
        self.first, self.second = f"hf{tag}{pid}a", f"hf{tag}{pid}b"
        self.veth_first, self.veth_second = f"hf{tag}{pid}x"[:15], f"hf{tag}{pid}y"[:15]
        self.first_ip, self.second_ip, self.prefix = first_ip, second_ip, prefix
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.first, self.second):
            ip("netns", "add", ns)
            self.created.append(ns)
        ip("-n", self.first, "link", "add", self.veth_first, "type", "veth",
           "peer", "name", self.veth_second, "netns", self.second)
        for ns, veth, addr in ((self.first, self.veth_first, self.first_ip), (self.second, self.veth_second, self.second_ip)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/{self.prefix}", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")

    def mtu(self) -> int | None:
        out = ip("-n", self.first, "-j", "link", "show", self.veth_first, check=False)
        try:
            return json.loads(out.stdout)[0]["mtu"]
        except (ValueError, LookupError):
            return None

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for ns in self.created:
            out = ip("netns", "pids", ns, check=False)
            pids.update(int(p) for p in out.stdout.split() if p.strip().isdigit())
        return pids

    def kill_all(self) -> None:
        """Every process inside our namespaces is ours."""
        for pid in self.pids():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass

    def delete(self) -> None:
        if self.first in self.created:
            ip("-n", self.first, "link", "del", self.veth_first, check=False)  # takes its peer with it
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")

# Run inside a namespace: one HTTP request, answered as one JSON line. trust_env=False:
# no proxy from the environment, so the request goes to the URL's address and nowhere else.
CLIENT = r"""
import json, sys, httpx
method, url, body, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
headers = json.loads(sys.argv[5])
try:
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        r = client.request(method, url, json=body, headers=headers)
    print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "body": r.text}))
except httpx.HTTPError as exc:
    print(json.dumps({"error": repr(exc)}))
"""


def namespace_env(**extra: str) -> dict[str, str]:
    """The test environment (tests/support.py child_env) without proxies: inside a
    namespace, traffic goes to the addresses asked for and nowhere else."""
    from tests.support import child_env

    env = child_env(RAY_USAGE_STATS_ENABLED="0", **extra)
    return {k: v for k, v in env.items() if k.lower() not in PROXY_VARIABLES}


def in_namespace(ns: str, method: str, url: str, body: dict | None = None, timeout_s: float = 10,
                 headers: dict | None = None) -> dict:
    """One HTTP request sent from inside `ns`: {"status", "headers", "body"} or {"error"}."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, method, url, json.dumps(body), str(timeout_s),
         json.dumps(headers or {})],
        env=namespace_env(), capture_output=True, text=True, timeout=timeout_s + 60,
    )
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": f"client exited {out.returncode}: {out.stderr.strip()[-2000:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_gateway(ns: str, url: str, popen: subprocess.Popen, timeout_s: float) -> str | None:
    """Wait until the gateway at `url` answers /healthz from inside `ns`; why not, if it never does."""
    deadline = time.monotonic() + timeout_s
    while in_namespace(ns, "GET", f"{url}/healthz", timeout_s=2).get("status") != 200:
        if popen.poll() is not None or time.monotonic() > deadline:
            return f"gateway in {ns} not up (exit {popen.poll()})"
        time.sleep(0.5)
    return None


def wait_for_fleet(ns: str, url: str, nodes: set[str], model: str, popens: list[subprocess.Popen],
                   deadline: float) -> tuple[dict, str | None]:
    """Wait, asking from inside `ns`, until `nodes` are alive and `model` is ready: (the last
    cluster view, None), or (the last view, why not) once a process exited or time ran out."""
    view: dict = {}
    while True:
        answer = in_namespace(ns, "GET", f"{url}/api/cluster")
        if answer.get("status") == 200:
            view = json.loads(answer["body"])
            alive = {n["name"] for n in view["nodes"] if n["state"] == "alive"}
            states = {m["name"]: m["state"] for m in view["models"]}
            if nodes <= alive and states.get(model) == "ready":
                return view, None
        exited = [f"{p.args[3]}: {p.args[7]} exited {p.returncode}" for p in popens if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            return view, f"not {', '.join(sorted(nodes))} alive and {model} ready (exited: {exited})"
        time.sleep(1)


def start_in(ns: str, command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:  # `ip netns exec` execs the command: the PID is the command's
        return subprocess.Popen(["ip", "netns", "exec", ns, *command], env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_all(popens: list[subprocess.Popen], hosts: VethHosts, rounds: int = 5) -> None:
    """Ctrl-C each process we started (in order: the head first, it stops the replicas), then
    SIGKILL whatever of ours is left: their descendants, and anything still running inside
    our namespaces (all of it ours)."""
    ours: set[int] = set(hosts.pids())
    for popen in popens:
        ours.add(popen.pid)
        try:
            ours.update(p.pid for p in psutil.Process(popen.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for popen in popens:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
    for _ in range(rounds):  # processes started while we were stopping show up here too
        ours |= hosts.pids()
        for pid in ours:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)
        if not hosts.pids():
            break
