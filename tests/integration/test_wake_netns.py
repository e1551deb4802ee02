"""Wake-on-LAN on a real network: the head's sender (orchestrator/wake.py) in one network
namespace broadcasts the magic packet for a sleeping machine last seen at an address of the
other namespace, where a UDP listener on port 9 (standing in for the sleeping card) receives
it. The namespaces are joined by a veth pair (10.232.0.0/24) and have no other route, so the
limited broadcast (255.255.255.255) has nowhere to go: the directed one must carry it.

Needs root (`ip netns add`); skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from orchestrator.core.wake_on_lan import WAKE_PORT, magic_packet
from tests.netns import VethHosts

pytestmark = pytest.mark.integration

HEAD_IP, SLEEPER_IP = "10.232.0.1", "10.232.0.2"
MAC = "3c:7c:3f:1a:2b:4d"

# The sleeping card: one datagram on UDP port 9, printed as JSON (its bytes, where it came from).
LISTENER = r"""
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", int(sys.argv[1])))
sock.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, peer = sock.recvfrom(2048)
    print(json.dumps({"hex": data.hex(), "from": peer[0]}), flush=True)
except socket.timeout:
    print(json.dumps({"timeout": True}), flush=True)
"""

SENDER = r"""
import json, sys
from orchestrator.wake import send_wake_packet
print(json.dumps(send_wake_packet(sys.argv[1], sys.argv[2])))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def test_the_heads_magic_packet_reaches_a_listener_on_the_sleepers_network(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    hosts = VethHosts("wol", HEAD_IP, SLEEPER_IP, 24)
    listener = None
    try:
        try:
            hosts.create()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        listener = subprocess.Popen(
            ["ip", "netns", "exec", hosts.second, sys.executable, "-c", LISTENER, str(WAKE_PORT), "20"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        sent = subprocess.run(
            ["ip", "netns", "exec", hosts.first, sys.executable, "-c", SENDER, MAC, SLEEPER_IP],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=os.getcwd())
        assert sent.returncode == 0, sent.stderr
        reached = json.loads(sent.stdout.strip().splitlines()[-1])
        assert reached[0] == "10.232.0.255"  # the broadcast of the network the sleeper was last seen on
        out, err = listener.communicate(timeout=30)
        got = json.loads(out.strip().splitlines()[-1])
        assert got.get("hex") == magic_packet(MAC).hex(), (got, err)
        assert got["from"] == HEAD_IP
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
            listener.wait(timeout=10)
        deadline = time.monotonic() + 10
        while hosts.pids() and time.monotonic() < deadline:
            hosts.kill_all()
            time.sleep(0.1)
        hosts.delete()
