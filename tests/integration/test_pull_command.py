"""`homefleet pull` on this machine, as a user runs it: a real HTTP server on 127.0.0.1 with
Range support for URLs, and the real huggingface_hub code path pointed by HF_ENDPOINT at a
local server that answers the Hub's resolve route."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.http_fixtures import fake_hf_endpoint, static_server
from tests.support import child_env, homefleet_command


def sha256_file(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture()
def web(tmp_path):
    root = tmp_path / "web"
    root.mkdir()
    (root / "model.gguf").write_bytes(os.urandom(6 << 20))
    return root


def pull(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(homefleet_command("pull", *args), env=child_env(**env), capture_output=True, text=True,
                          timeout=120)


def test_pull_of_a_url_lands_verified_in_the_models_dir_with_progress(tmp_path, web):
    store = tmp_path / "store"
    with static_server(web) as server:
        out = pull(server.file_url("model.gguf"), "--models-dir", str(store))
    assert out.returncode == 0, out.stderr
    landed = store / "model.gguf"
    assert sha256_file(landed) == sha256_file(web / "model.gguf")
    assert f"sha256 {sha256_file(landed)}" in out.stdout
    assert "done  100%  6 MiB / 6 MiB" in out.stderr
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == ["model.gguf"]


def test_an_interrupted_pull_resumes_where_it_stopped(tmp_path, web):
    store = tmp_path / "store"
    with static_server(web, drop_after_bytes=2 << 20, drops_left=None) as server:
        first = pull(server.file_url("model.gguf"), "--models-dir", str(store))
        assert first.returncode == 1 and "connection closed" in first.stderr
        assert not (store / "model.gguf").exists()  # no half file under the model's name
        server.faults.drop_after_bytes = None
        second = pull(server.file_url("model.gguf"), "--models-dir", str(store))
        assert second.returncode == 0, second.stderr
        assert server.ranges("model.gguf")[-1] == f"bytes={2 << 20}-"
    assert sha256_file(store / "model.gguf") == sha256_file(web / "model.gguf")


def test_pull_of_an_hf_name_goes_through_huggingface_hub_with_the_token(tmp_path, web):
    store = tmp_path / "store"
    files = {("someone/tiny-GGUF", "main", "tiny-q4_k_m.gguf"): web / "model.gguf"}
    with fake_hf_endpoint(files, token="hf_test_token") as hub:
        out = pull("hf://someone/tiny-GGUF/tiny-q4_k_m.gguf", "--models-dir", str(store),
                   HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_TELEMETRY="1")
        assert out.returncode == 0, out.stderr
        assert all(r.authorization == "Bearer hf_test_token" for r in hub.resolves)
    assert sha256_file(store / "tiny-q4_k_m.gguf") == sha256_file(web / "model.gguf")


def test_pull_with_a_pin_the_hub_contradicts_downloads_nothing(tmp_path, web):
    store = tmp_path / "store"
    files = {("someone/tiny-GGUF", "main", "tiny.gguf"): web / "model.gguf"}
    with fake_hf_endpoint(files) as hub:
        out = pull("hf://someone/tiny-GGUF/tiny.gguf", "--models-dir", str(store), "--sha256", "ab" * 32,
                   HF_ENDPOINT=hub.url)
        assert out.returncode == 1
        assert "ab" * 32 in out.stderr and sha256_file(web / "model.gguf") in out.stderr
        assert not hub.gets()  # no body was fetched
    assert not (store / "tiny.gguf").exists()


def test_pull_of_a_missing_hf_file_says_what_is_missing(tmp_path, web):
    files = {("someone/tiny-GGUF", "main", "tiny.gguf"): web / "model.gguf"}
    with fake_hf_endpoint(files) as hub:
        out = pull("hf://someone/tiny-GGUF/other.gguf", "--models-dir", str(tmp_path / "s"), HF_ENDPOINT=hub.url)
    assert out.returncode == 1 and "other.gguf" in out.stderr


def test_pull_of_a_file_name_without_a_node_explains_how(tmp_path):
    out = pull("model.gguf", "--models-dir", str(tmp_path))
    assert out.returncode == 2 and "--node NAME" in out.stderr


def test_pull_of_an_unsupported_source_is_refused(tmp_path):
    out = pull("ftp://example.invalid/x.gguf", "--models-dir", str(tmp_path))
    assert out.returncode == 2 and "unsupported scheme" in out.stderr
