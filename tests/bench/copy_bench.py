"""Copy benchmark: one model file copied between two "nodes" by homefleet (FileServer ->
Transfer) vs `curl` from a static sendfile server (the same FileServer without a key, and
nginx when it is installed), same file, same machine, alternating runs. Prints JSON.

    python -m tests.bench.copy_bench [--size-mib 1024] [--runs 3]

Scenarios:
- "loopback": the source servers listen on 127.0.0.2; receivers run on the host.
- "veth": the source servers run in network namespace A (10.232.0.1), the receivers in
  namespace B (10.232.0.2), joined by a veth pair. Needs root and `ip`; skipped otherwise.

Each side is its own process, as on real nodes: the source is a Python process running
worker.file_server.FileServer over a worker.store.ModelStore with a bearer key (as a
node's agent does), the target a Python process running worker.transfer.Transfer into a
fresh ModelStore with the expected sha256 (so it hashes and verifies as in the product).
Every run writes the whole file: what the runs before wrote is deleted (and the page cache
written back) just before it starts. The homefleet receiver is timed inside its process,
around `Transfer.run()` (an agent is already running when it copies); the figures for the
whole process, Python start-up and imports included, are reported beside them.

Goal: homefleet MiB/s >= 0.8 x curl MiB/s against each static server, in each scenario.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.netns import VethHosts

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
GOAL_RATIO = 0.8
FILE_NAME = "copy-bench.gguf"
LOOPBACK_IP = "127.0.0.2"
# Not 10.231.0.0/24 (tests/integration/test_netns.py): the two never clash.
NS_SOURCE_IP, NS_TARGET_IP, NS_PREFIX = "10.232.0.1", "10.232.0.2", 24
START_TIMEOUT_S = 30
COPY_TIMEOUT_S = 300


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    """The children's environment: no proxy (curl would honour one), unbuffered Python."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "grpc_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cpu_s(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


# ---- the two roles a child process plays ------------------------------------------------
def role_serve(root: str, host: str, keyed: bool) -> int:
    """A node's source: FileServer over a ModelStore; prints {"port", "pid"}; runs until stdin closes."""
    from worker.file_server import FileServer
    from worker.store import ModelStore

    key = os.environ.get("HF_COPY_BENCH_KEY") if keyed else None
    store = ModelStore(root)
    server = FileServer(host, 0, store.path_of, key).start()
    print(json.dumps({"port": server.server_address[1], "pid": os.getpid()}), flush=True)
    try:
        sys.stdin.read()  # the parent closes our stdin (or kills us) to stop us
    finally:
        server.stop()
    return 0


def role_receive(root: str, url: str, sha256: str, size: int) -> int:
    """A node's target: the product's Transfer into a fresh store; prints timings as JSON."""
    from worker.store import ModelStore
    from worker.transfer import Source, Transfer, TransferSpec

    key = os.environ["HF_COPY_BENCH_KEY"]
    store = ModelStore(root)
    spec = TransferSpec(transfer_id=secrets.token_hex(8), name=FILE_NAME,
                        sources=(Source("bench-source", url, {"Authorization": f"Bearer {key}"}, "copy"),),
                        sha256=sha256, size_bytes=size)
    transfer = Transfer(store, spec)
    # Started and imported: wait for "go", so that the parent clears the last run's bytes just before.
    print(json.dumps({"ready": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stored = transfer.run()
    t1, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    path = Path(stored.path)
    assert stored.sha256 == sha256, f"stored sha256 {stored.sha256} != {sha256}"
    assert path.stat().st_size == size, f"{path} holds {path.stat().st_size} bytes, expected {size}"
    print(json.dumps({"wall_s": t1 - t0, "cpu_s": _cpu_s(ru1) - _cpu_s(ru0),
                      "user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
                      "minor_faults": ru1.ru_minflt - ru0.ru_minflt, "involuntary_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
                      "path": str(path), "sha256": stored.sha256, "size_bytes": stored.size_bytes}), flush=True)
    return 0


# ---- servers ----------------------------------------------------------------------------
class Server:
    """A source process we started: its PID, the processes whose CPU counts as sending, a URL."""

    def __init__(self, name: str, popen: subprocess.Popen, url: str) -> None:
        self.name, self.popen, self.url = name, popen, url
        self.procs = [psutil.Process(popen.pid)]

    def add_children(self) -> None:
        try:
            self.procs += self.procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            pass

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        pids = {p.pid for p in self.procs}
        try:
            pids |= {c.pid for c in self.procs[0].children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        if self.popen.poll() is None:
            if self.popen.stdin:
                try:
                    self.popen.stdin.close()
                except OSError:
                    pass
            self.popen.terminate()  # FileServer: SIGTERM; nginx: fast shutdown, workers too
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()


def start_file_server(prefix: list[str], root: Path, host: str, keyed: bool, key: str, log: Path) -> Server:
    env = {**_env(), "HF_COPY_BENCH_KEY": key}
    cmd = [*prefix, sys.executable, "-m", "tests.bench.copy_bench", "--role", "serve", "--root", str(root),
           "--host", host] + (["--keyed"] if keyed else [])
    with open(log, "wb") as err:
        popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    ready, _, _ = select.select([popen.stdout], [], [], START_TIMEOUT_S)
    line = popen.stdout.readline() if ready else b""
    if not line:
        popen.kill()
        popen.wait()
        raise RuntimeError(f"FileServer did not start (exit {popen.poll()}): {log.read_text()[-2000:]}")
    port = json.loads(line)["port"]
    url = f"http://{host}:{port}/files/{FILE_NAME}"
    return Server("fileserver" + ("+key" if keyed else ""), popen, url)


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


NGINX_CONF = """\
user root;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        root {root};
    }}
}}
"""


def start_nginx(prefix: list[str], probe_prefix: list[str], root: Path, host: str, workdir: Path) -> Server:
    """nginx in the foreground as our child, serving `root` with sendfile; ready once it answers."""
    nginx = shutil.which("nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(LOOPBACK_IP)  # a namespace of ours is fresh: any port is free there
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, host=host, port=port, root=root))
    log = workdir / "stderr.log"
    with open(log, "wb") as err:
        popen = subprocess.Popen([*prefix, nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                                 env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://{host}:{port}/{FILE_NAME}"
    server = Server("nginx", popen, url)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        probe = subprocess.run([*probe_prefix, "curl", "-s", "-I", "-o", "/dev/null", "-w", "%{http_code}", url],
                               env=_env(), capture_output=True, text=True, timeout=10)
        if probe.stdout.strip() == "200":
            break
        if popen.poll() is not None or time.monotonic() > deadline:
            server.stop()
            error_log = workdir / "error.log"
            errors = error_log.read_text()[-1000:] if error_log.exists() else ""
            raise RuntimeError(f"nginx did not start (exit {popen.poll()}, probe {probe.stdout!r}): "
                               f"{log.read_text()[-1000:]} {errors}")
        time.sleep(0.1)
    server.add_children()  # the worker process sends the bytes
    return server


# ---- one copy each way ------------------------------------------------------------------
def _clear(dirs: list[Path]) -> None:
    """Remove what earlier runs wrote and write the page cache back, just before a run, so runs
    start alike. (Just before, not just after: on a VM that hands freed guest memory back to
    the host, pages freed seconds earlier cost a host fault each when written again.)"""
    for d in dirs:
        if d.is_dir():
            for entry in d.iterdir():
                entry.unlink()
    os.sync()


def run_homefleet(prefix: list[str], server: Server, target_root: Path, sha256: str, size: int, key: str,
                  clear: list[Path]) -> dict:
    target_root.mkdir(parents=True, exist_ok=True)
    cmd = [*prefix, sys.executable, "-m", "tests.bench.copy_bench", "--role", "receive", "--root", str(target_root),
           "--url", server.url, "--sha256", sha256, "--size", str(size)]
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=REPO, env={**_env(), "HF_COPY_BENCH_KEY": key}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = popen.stdout.readline()
        startup_s = time.perf_counter() - t0
        if not ready.strip():
            raise RuntimeError(f"receiver exited {popen.wait()} before it was ready: {popen.stderr.read()[-3000:]}")
        _clear(clear)
        sender0 = server.cpu_s()
        t1 = time.perf_counter()
        stdout, stderr = popen.communicate("go\n", timeout=COPY_TIMEOUT_S)
        t2, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        sender1 = server.cpu_s()
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    if popen.returncode != 0:
        raise RuntimeError(f"receiver exited {popen.returncode}: {stderr[-3000:]}")
    got = json.loads(stdout.strip().splitlines()[-1])
    copied = target_root / FILE_NAME
    assert copied.is_file() and copied.stat().st_size == size, f"{copied}: missing or not {size} bytes"
    assert got["sha256"] == sha256 and got["size_bytes"] == size
    return {
        "wall_s": round(got["wall_s"], 4),
        "mib_s": round(size / MIB / got["wall_s"], 1),
        "receiver_cpu_s": round(got["cpu_s"], 3),
        "receiver_user_s": round(got["user_s"], 3),
        "receiver_sys_s": round(got["sys_s"], 3),
        "receiver_minor_faults": got["minor_faults"],
        "receiver_involuntary_switches": got["involuntary_switches"],
        "sender_cpu_s": round(sender1 - sender0, 3),
        "process_startup_s": round(startup_s, 4),
        "process_wall_s": round(startup_s + t2 - t1, 4),
        "process_mib_s": round(size / MIB / (startup_s + t2 - t1), 1),
        "process_cpu_s": round(_cpu_s(ru1) - _cpu_s(ru0), 3),
        "sha256_ok": True,
        "size_ok": True,
    }


def run_curl(prefix: list[str], server: Server, out_dir: Path, size: int, clear: list[Path]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / FILE_NAME
    _clear(clear)
    sender0 = server.cpu_s()
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run([*prefix, "curl", "-s", "-o", str(out_path), server.url], env=_env(),
                         capture_output=True, text=True, timeout=COPY_TIMEOUT_S)
    t1, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    sender1 = server.cpu_s()
    if out.returncode != 0:
        raise RuntimeError(f"curl exited {out.returncode}: {out.stderr[-2000:]}")
    got = out_path.stat().st_size if out_path.exists() else None
    assert got == size, f"curl wrote {got} bytes, expected {size}"
    return {
        "wall_s": round(t1 - t0, 4),
        "mib_s": round(size / MIB / (t1 - t0), 1),
        "receiver_cpu_s": round(_cpu_s(ru1) - _cpu_s(ru0), 3),
        "receiver_user_s": round(ru1.ru_utime - ru0.ru_utime, 3),
        "receiver_sys_s": round(ru1.ru_stime - ru0.ru_stime, 3),
        "receiver_minor_faults": ru1.ru_minflt - ru0.ru_minflt,
        "receiver_involuntary_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
        "sender_cpu_s": round(sender1 - sender0, 3),
        "size_ok": True,
    }


def summarize(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {**{f"median_{k}": round(statistics.median(r[k] for r in runs), 4) for k in keys},
            "best_mib_s": max(r["mib_s"] for r in runs), "runs": runs}


# ---- one scenario -----------------------------------------------------------------------
def scenario(name: str, work: Path, source_root: Path, sha256: str, size: int, runs: int, warmup: int,
             server_prefix: list[str], client_prefix: list[str], host: str) -> dict:
    key = secrets.token_urlsafe(32)
    servers: list[Server] = []
    try:
        keyed = start_file_server(server_prefix, source_root, host, True, key, work / f"{name}-keyed.log")
        servers.append(keyed)
        static = start_file_server(server_prefix, source_root, host, False, key, work / f"{name}-static.log")
        servers.append(static)
        nginx = None
        nginx_note = None
        if shutil.which("nginx"):
            nginx = start_nginx(server_prefix, client_prefix, source_root, host, work / f"{name}-nginx")
            servers.append(nginx)
        else:
            nginx_note = "nginx not found (shutil.which('nginx') is None): only the FileServer-based curl figure"
        results: dict[str, list[dict]] = {"homefleet": [], "curl_fileserver": [], "curl_nginx": []}
        target, curl_out = work / f"{name}-target-store", work / f"{name}-curl-out"
        outputs = [target, curl_out]
        for i in range(warmup):  # not counted: first connections, first page-cache use of the target dirs
            say(f"[{name}] warm-up {i + 1}/{warmup} ...")
            run_homefleet(client_prefix, keyed, target, sha256, size, key, outputs)
            for server in (static, nginx):
                if server is not None:
                    run_curl(client_prefix, server, curl_out, size, outputs)
        for i in range(runs):
            say(f"[{name}] run {i + 1}/{runs}: homefleet ...")
            r = run_homefleet(client_prefix, keyed, target, sha256, size, key, outputs)
            say(f"[{name}]   homefleet       {r['mib_s']:8.1f} MiB/s  recv cpu {r['receiver_cpu_s']:.2f} s"
                f"  send cpu {r['sender_cpu_s']:.2f} s")
            results["homefleet"].append(r)
            r = run_curl(client_prefix, static, curl_out, size, outputs)
            say(f"[{name}]   curl fileserver {r['mib_s']:8.1f} MiB/s  recv cpu {r['receiver_cpu_s']:.2f} s"
                f"  send cpu {r['sender_cpu_s']:.2f} s")
            results["curl_fileserver"].append(r)
            if nginx is not None:
                r = run_curl(client_prefix, nginx, curl_out, size, outputs)
                say(f"[{name}]   curl nginx      {r['mib_s']:8.1f} MiB/s  recv cpu {r['receiver_cpu_s']:.2f} s"
                    f"  send cpu {r['sender_cpu_s']:.2f} s")
                results["curl_nginx"].append(r)
    finally:
        for server in reversed(servers):
            server.stop()
        _clear([work / f"{name}-target-store", work / f"{name}-curl-out"])
    hf = summarize(results["homefleet"])
    out: dict = {"source_address": host, "homefleet": hf, "curl_fileserver": summarize(results["curl_fileserver"])}
    out["curl_nginx"] = summarize(results["curl_nginx"]) if results["curl_nginx"] else {"skipped": nginx_note}
    ratios = {}
    for static_name in ("curl_fileserver", "curl_nginx"):
        if "median_mib_s" in out[static_name]:
            ratios[f"ratio_vs_{static_name}"] = round(hf["median_mib_s"] / out[static_name]["median_mib_s"], 3)
            ratios[f"ratio_best_vs_{static_name}"] = round(hf["best_mib_s"] / out[static_name]["best_mib_s"], 3)
            ratios[f"ratio_incl_python_startup_vs_{static_name}"] = round(
                hf["median_process_mib_s"] / out[static_name]["median_mib_s"], 3)
    out.update(ratios)
    out["goal_met"] = all(v >= GOAL_RATIO for k, v in ratios.items() if k.startswith("ratio_vs_"))
    return out


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    chunk = 64 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            f.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per scenario first")
    parser.add_argument("--scenarios", default="loopback,veth", help="comma-separated: loopback, veth")
    # The roles of the child processes (not for people).
    parser.add_argument("--role", choices=("serve", "receive"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--keyed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--sha256", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "serve":
        return role_serve(args.root, args.host, args.keyed)
    if args.role == "receive":
        return role_receive(args.root, args.url, args.sha256, args.size)

    # SIGTERM runs the finally blocks too: no namespace or process is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from worker import file_server, transfer

    size = args.size_mib * MIB
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="homefleet-copy-bench-"))
    work.chmod(0o755)
    result: dict = {
        "benchmark": "copy_bench",
        "size_mib": args.size_mib,
        "runs": args.runs,
        "warmup_runs": args.warmup,
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "nginx": shutil.which("nginx"), "curl": shutil.which("curl")},
        "product": {"transfer_BUFFER_BYTES": transfer.BUFFER_BYTES, "transfer_READ_BYTES": transfer.READ_BYTES,
                    "file_server_SENDFILE_CHUNK_BYTES": file_server.SENDFILE_CHUNK_BYTES},
        "scenarios": {},
    }
    try:
        source_root = work / "source-store"
        source_root.mkdir()
        say(f"writing {args.size_mib} MiB of random bytes to {source_root / FILE_NAME} ...")
        sha256 = make_file(source_root / FILE_NAME, size)
        os.sync()
        result["file"] = {"name": FILE_NAME, "size_bytes": size, "sha256": sha256}

        if "loopback" in wanted:
            result["scenarios"]["loopback"] = scenario("loopback", work, source_root, sha256, size, args.runs,
                                                       args.warmup, [], [], LOOPBACK_IP)
        if "veth" in wanted:
            why = None
            if os.geteuid() != 0:
                why = "needs root to create network namespaces"
            elif shutil.which("ip") is None:
                why = "needs iproute2 (`ip`)"
            if why:
                result["scenarios"]["veth"] = {"skipped": why}
            else:
                ns = VethHosts("cb", NS_SOURCE_IP, NS_TARGET_IP, NS_PREFIX)
                try:
                    try:
                        ns.create()
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        result["scenarios"]["veth"] = {"skipped": f"cannot create network namespaces: {exc}"}
                    else:
                        veth = scenario("veth", work, source_root, sha256, size, args.runs, args.warmup,
                                        ["ip", "netns", "exec", ns.first], ["ip", "netns", "exec", ns.second],
                                        NS_SOURCE_IP)
                        result["scenarios"]["veth"] = {"veth_mtu": ns.mtu(), "receiver_address": NS_TARGET_IP, **veth}
                finally:
                    ns.kill_all()
                    ns.delete()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = [s for s in result["scenarios"].values() if "goal_met" in s]
    result["goal"] = {"ratio_at_least": GOAL_RATIO,
                      "ratio": "ratio_vs_*: homefleet median MiB/s / curl median MiB/s, against each static server; "
                               "ratio_best_vs_*: the same with each side's best run; ratio_incl_python_startup_vs_*: "
                               "homefleet timed from its process start (not what an agent, already running, pays)"}
    result["goal_met"] = bool(measured) and all(s["goal_met"] for s in measured)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
