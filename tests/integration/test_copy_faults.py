"""A copy whose source node vanishes mid-file resumes from the model's URL: the head (the
desktop, empty store) is to serve a model whose file only a NAS-like node holds, with the
same file published on a local web server. The NAS is killed (no goodbye) mid-copy.
"""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.gguf_factory import write_gguf
from tests.http_fixtures import static_server
from tests.support import (
    GIB,
    child_env,
    declared_machine,
    homefleet_join,
    homefleet_up,
    model_of,
    ray_address_of,
    replica_of,
    write_config,
)

pytestmark = pytest.mark.integration


def sha256_file(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def copy_cut(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cut")
    desktop_store, nas_store, web = tmp / "desktop-models", tmp / "nas-models", tmp / "web"
    for d in (desktop_store, nas_store, web):
        d.mkdir()
    medium = write_gguf(nas_store / "medium.gguf", n_layers=2, n_embd=1024, n_ff=4096, n_vocab=1024, seed=11)
    (web / "medium.gguf").write_bytes(medium.read_bytes())
    with static_server(web) as server:
        config = write_config(
            tmp / "cut.yaml",
            [{"name": "medium", "path": "medium.gguf", "url": server.file_url("medium.gguf"), "node": "desktop",
              "gpu_layers": 0, "context": 512, "chat_format": "chatml"}],
            cluster={"wait_for_nodes": ["nas"], "keep_free_disk_gib": 0, "copy_rate_limit_mib_s": 8},
        )
        env = child_env(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                        RAY_health_check_failure_threshold="4")
        desktop = declared_machine(tmp, "desktop", "configs/machines/desktop.yaml", 4 * GIB, 8 * GIB)
        nas = declared_machine(tmp, "nas", "configs/machines/laptop-2.yaml", 0, 4 * GIB, gpus=[])
        with homefleet_up(tmp, "--config", str(config), "--name", "desktop", "--hardware", desktop,
                          "--models-dir", str(desktop_store), env=env) as head:
            with homefleet_join(tmp, ray_address_of(head), "nas", "127.0.0.3", "--hardware", nas,
                                "--models-dir", str(nas_store), env=env) as nas_node:
                seen = cut_mid_copy(head, nas_node)
                view = head.wait_for_models({"medium": {"ready"}}, timeout_s=180)
                yield {"head": head, "seen": seen, "view": view, "web": server, "medium": medium,
                       "desktop_store": desktop_store}


def cut_mid_copy(head, nas_node) -> list[dict]:
    """Wait until the desktop is copying from the NAS, then kill every NAS process."""
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        model = model_of(head.cluster(), "medium")
        transfer = model["replicas"][0].get("transfer") if model["replicas"] else None
        if transfer:
            seen.append(transfer)
            if transfer["source"] == "nas" and transfer["bytes_done"] > 0 and transfer["state"] == "copying":
                for proc in nas_node.descendants():
                    proc.kill()
                nas_node.popen.kill()
                break
        if model["state"] in ("ready", "failed"):
            raise AssertionError(f"the copy ended before it could be cut: {model}")
        time.sleep(0.2)
    else:
        raise TimeoutError(f"never saw the copy from the NAS: {seen}\n{head.log()[-3000:]}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the rest of the file, from the URL
        model = model_of(head.cluster(), "medium")
        transfer = model["replicas"][0].get("transfer") if model["replicas"] else None
        if transfer:
            seen.append(transfer)
        if model["state"] != "copying" and model["state"] != "downloading":
            break
        time.sleep(0.2)
    return seen


def test_the_copy_resumes_from_the_url_at_the_byte_the_source_reached(copy_cut):
    # (The head may also have read the header's first MiB from the URL, as a closed range.)
    body_gets = [r for r in copy_cut["web"].ranges("medium.gguf") if r is None or r.endswith("-")]
    assert len(body_gets) == 1, body_gets  # one fetch of the rest of the file...
    start = int(body_gets[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < start < copy_cut["medium"].stat().st_size  # ...from the byte the NAS reached, not from 0
    sources = [t["source"] for t in copy_cut["seen"]]
    assert sources[0] == "nas" and sources[-1] == copy_cut["web"].file_url("medium.gguf")


def test_the_completed_copy_is_byte_identical_and_served_by_the_node_that_got_it(copy_cut):
    copied = copy_cut["desktop_store"] / "medium.gguf"
    assert sha256_file(copied) == sha256_file(copy_cut["medium"])
    head = copy_cut["head"]
    assert replica_of(copy_cut["view"], "medium")["node"] == "desktop"
    reply = httpx.post(f"{head.url}/v1/chat/completions", timeout=120, json={
        "model": "medium", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-homefleet-node"] == "desktop"
