"""Sources: http(s) and hf:// resolved before any byte moves, pulled into a store, GGUF headers
read from a file's first bytes. Real servers on 127.0.0.1: tests/http_fixtures' static server and
fake Hugging Face Hub, spoken to through huggingface_hub itself."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from orchestrator.core.gguf_file import GGUFError, GGUFTruncated, parse_gguf_prefix, read_gguf_header
from orchestrator.core.model_source import HfSource, HttpSource, SourceError, parse_url
from tests.gguf_factory import write_gguf
from tests.http_fixtures import fake_hf_endpoint, static_server
from tests.support import free_port
from worker.sources import ResolvedSource, SourceUnavailable, pull_into_store, read_remote_gguf_header, resolve_source
from worker.store import ModelStore, sidecar_path
from worker.transfer import TransferFailed

MIB = 1 << 20
CUT = MIB + 777
TOKEN = "hf_test_token_0123456789"
REPO = "me/tiny"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A directory with a 2 MiB file `m.gguf` and a real small GGUF `tiny.gguf`."""
    root = tmp_path_factory.mktemp("src")
    (root / "m.gguf").write_bytes(os.urandom(2 * MIB))
    write_gguf(root / "tiny.gguf", n_layers=1, n_embd=64, n_head=2, n_ff=128, n_vocab=5000)
    return root


def sha_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub_env(monkeypatch):
    """HF_TOKEN set; HF_ENDPOINT is set by each test to its fake hub's URL."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return monkeypatch


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "store")


# ---- http(s) ----------------------------------------------------------------------------


def test_resolve_http_learns_the_size_from_a_head_request(src):
    with static_server(src) as server:
        url = server.file_url("m.gguf")
        resolved = resolve_source(HttpSource(url))
    assert resolved == ResolvedSource(url=url, headers={}, label=url, sha256=None, size_bytes=2 * MIB)
    assert [r.method for r in server.requests] == ["HEAD"]
    transfer_source = resolved.as_transfer_source()
    assert (transfer_source.url, transfer_source.kind, transfer_source.label) == (url, "download", url)


def test_resolve_http_falls_back_to_a_one_byte_get_when_head_is_refused(src):
    with static_server(src, head_status=405) as server:
        resolved = resolve_source(HttpSource(server.file_url("m.gguf")))
    assert resolved.size_bytes == 2 * MIB
    assert [(r.method, r.range) for r in server.requests] == [("HEAD", None), ("GET", "bytes=0-0")]


def test_resolve_http_of_a_missing_file_is_unavailable_and_names_the_url(src):
    with static_server(src) as server:
        url = server.file_url("missing.gguf")
        with pytest.raises(SourceUnavailable, match="404") as failed:
            resolve_source(HttpSource(url))
    assert url in str(failed.value)


def test_resolve_http_that_needs_a_key_is_unavailable_with_401(src):
    with static_server(src, key="k") as server:
        with pytest.raises(SourceUnavailable, match="401.*credentials"):
            resolve_source(HttpSource(server.file_url("m.gguf")))


def test_resolve_http_of_an_unreachable_server_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/m.gguf"
    with pytest.raises(SourceUnavailable, match="cannot connect") as failed:
        resolve_source(HttpSource(url), timeout_s=5)
    assert url in str(failed.value)


# ---- hf:// ------------------------------------------------------------------------------


def test_resolve_hf_takes_sha256_and_size_from_the_hub_and_sends_hf_token(src, hub_env):
    path = src / "m.gguf"
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): path}, token=TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        resolved = resolve_source(parse_url(f"hf://{REPO}/m.gguf"))
    assert (resolved.sha256, resolved.size_bytes) == (sha_of(path), 2 * MIB)
    assert resolved.url == hub.resolve_url(REPO, "m.gguf")
    assert resolved.label == f"hf://{REPO}/m.gguf"
    assert resolved.headers.get("authorization") == f"Bearer {TOKEN}"  # the hub serves the bytes itself
    assert [(r.method, r.authorization) for r in hub.resolves] == [("HEAD", f"Bearer {TOKEN}")]


def test_resolve_hf_of_a_revision_and_a_file_in_a_folder(src, hub_env):
    path = src / "m.gguf"
    with fake_hf_endpoint({(REPO, "v1.0", "q4/m.gguf"): path}) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        source = parse_url(f"hf://{REPO}/q4/m.gguf@v1.0")
        resolved = resolve_source(source)
    assert source == HfSource(REPO, "q4/m.gguf", "v1.0") and source.file_name == "m.gguf"
    assert resolved.url == hub.resolve_url(REPO, "q4/m.gguf", "v1.0") and resolved.sha256 == sha_of(path)


def test_hf_file_on_storage_is_fetched_through_the_resolve_url_and_the_token_stays_on_the_hub(src, hub_env, tmp_path):
    path = src / "m.gguf"
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): path}, token=TOKEN, cdn=True) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        resolved = resolve_source(parse_url(f"hf://{REPO}/m.gguf"))
        # The resolve route, not the signed storage URL it redirects to: that one expires.
        assert resolved.url == hub.resolve_url(REPO, "m.gguf")
        assert (resolved.sha256, resolved.size_bytes) == (sha_of(path), 2 * MIB)  # from X-Linked-Etag / -Size
        assert hub.cdn.requests == []
        stored = pull_into_store(f"hf://{REPO}/m.gguf", ModelStore(tmp_path / "store"))
        assert stored.sha256 == sha_of(path)
        assert hub.gets() and all(r.authorization == f"Bearer {TOKEN}" for r in hub.gets())
        assert hub.cdn.gets() and all(r.authorization is None for r in hub.cdn.gets())


def test_resolve_hf_of_a_plain_git_file_has_a_size_but_no_sha256(src, hub_env):
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): src / "m.gguf"}, lfs=False) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        resolved = resolve_source(parse_url(f"hf://{REPO}/m.gguf"))
    assert resolved.sha256 is None and resolved.size_bytes == 2 * MIB


def test_resolve_hf_reads_hf_endpoint_when_called_not_when_imported(src, hub_env):
    files = {(REPO, "main", "m.gguf"): src / "m.gguf"}
    with fake_hf_endpoint(files) as first, fake_hf_endpoint(files) as second:
        for hub in (first, second):
            hub_env.setenv("HF_ENDPOINT", hub.url)
            assert resolve_source(parse_url(f"hf://{REPO}/m.gguf")).url.startswith(hub.url + "/")
    assert len(first.resolves) == len(second.resolves) == 1


@pytest.mark.parametrize("text, token, words", [
    (f"hf://{REPO}/m.gguf", "hf_wrong", "HF_TOKEN"),
    (f"hf://{REPO}/m.gguf", None, "HF_TOKEN"),
    ("hf://me/other/m.gguf", TOKEN, "no such repository"),
    (f"hf://{REPO}/missing.gguf", TOKEN, "no file 'missing.gguf'"),
    (f"hf://{REPO}/m.gguf@v9", TOKEN, "no revision 'v9'"),
])
def test_resolve_hf_errors_are_unavailable_and_name_the_source(src, hub_env, text, token, words):
    if token is None:
        hub_env.delenv("HF_TOKEN")
    else:
        hub_env.setenv("HF_TOKEN", token)
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): src / "m.gguf"}, token=TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(SourceUnavailable) as failed:
            resolve_source(parse_url(text))
    assert text in str(failed.value) and words in str(failed.value)


def test_resolve_hf_with_an_unreachable_hub_is_unavailable(hub_env):
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SourceUnavailable, match="cannot reach the Hub") as failed:
        resolve_source(parse_url(f"hf://{REPO}/m.gguf"), timeout_s=5)
    assert f"hf://{REPO}/m.gguf" in str(failed.value)


# ---- pull ---------------------------------------------------------------------------------


def _assert_copied(store: ModelStore, stored, expected_path) -> None:
    assert stored.path == str(store.root / expected_path.name)
    assert (store.root / expected_path.name).read_bytes() == expected_path.read_bytes()
    assert stored.sha256 == sha_of(expected_path) and stored.copied_by_homefleet
    sidecar = json.loads(sidecar_path(store.root / expected_path.name).read_text())
    assert sidecar["copied_by_homefleet"] is True and sidecar["sha256"] == stored.sha256
    assert not any(".partial" in p.name for p in store.root.iterdir())


def test_pull_of_an_http_url_lands_verified_in_the_store(src, store):
    seen = []
    with static_server(src) as server:
        stored = pull_into_store(server.file_url("m.gguf"), store, on_progress=seen.append, transfer_id="p1")
    _assert_copied(store, stored, src / "m.gguf")
    assert seen[-1].state == "done" and seen[-1].transfer_id == "p1" and seen[-1].kind == "download"


@pytest.mark.parametrize("cdn", [False, True], ids=["served-by-hub", "redirected-to-storage"])
def test_pull_of_an_hf_file_lands_verified_in_the_store(src, store, hub_env, cdn):
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): src / "m.gguf"}, token=TOKEN, cdn=cdn) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        stored = pull_into_store(f"hf://{REPO}/m.gguf", store)
        bytes_from = hub.cdn if cdn else hub
        assert [(r.method, r.authorization) for r in bytes_from.gets()] == [
            ("GET", None if cdn else f"Bearer {TOKEN}")]
    _assert_copied(store, stored, src / "m.gguf")


def test_pull_with_a_pin_that_disagrees_with_the_hub_fails_before_downloading(src, store, hub_env):
    pin = "ab" * 32
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): src / "m.gguf"}) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(TransferFailed) as failed:
            pull_into_store(f"hf://{REPO}/m.gguf", store, sha256=pin.upper())
    assert pin in str(failed.value) and sha_of(src / "m.gguf") in str(failed.value)
    assert hub.gets() == [] and list(store.root.iterdir()) == []


def test_pull_of_an_http_url_enforces_a_pinned_sha256(src, store):
    with static_server(src) as server:
        with pytest.raises(TransferFailed, match="sha256"):
            pull_into_store(server.file_url("m.gguf"), store, sha256="cd" * 32)
        assert len(server.gets()) == 3  # max_attempts
        stored = pull_into_store(server.file_url("m.gguf"), store, sha256=f"sha256:{sha_of(src / 'm.gguf')}")
    assert stored.sha256 == sha_of(src / "m.gguf")


def test_pull_with_a_malformed_pin_is_refused(src, store):
    with pytest.raises(SourceError, match="64 hexadecimal"):
        pull_into_store("http://127.0.0.1:9/m.gguf", store, sha256="abc")


def test_pull_of_an_http_url_resumes_after_an_interrupted_first_try(src, store):
    with static_server(src, drop_after_bytes=CUT) as server:
        with pytest.raises(TransferFailed):
            pull_into_store(server.file_url("m.gguf"), store)
        assert store.partial_path("m.gguf").stat().st_size == CUT
        stored = pull_into_store(server.file_url("m.gguf"), store)
    assert server.ranges() == [None, f"bytes={CUT}-"]
    _assert_copied(store, stored, src / "m.gguf")


def test_pull_of_an_hf_file_resumes_after_an_interrupted_first_try(src, store, hub_env):
    with fake_hf_endpoint({(REPO, "main", "m.gguf"): src / "m.gguf"}, token=TOKEN, drop_after_bytes=CUT) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(TransferFailed):
            pull_into_store(f"hf://{REPO}/m.gguf", store)
        stored = pull_into_store(f"hf://{REPO}/m.gguf", store)
    assert hub.ranges() == [None, f"bytes={CUT}-"]
    _assert_copied(store, stored, src / "m.gguf")


# ---- GGUF headers from a file's first bytes -------------------------------------------------------


def _same_header(remote, local) -> bool:
    return dataclasses.replace(remote, path=local.path) == local


def test_remote_gguf_header_equals_the_local_one(src):
    local = read_gguf_header(src / "tiny.gguf")
    with static_server(src) as server:
        resolved = resolve_source(HttpSource(server.file_url("tiny.gguf")))
        remote = read_remote_gguf_header(resolved)
    assert _same_header(remote, local) and remote.path == resolved.label
    assert server.ranges() == [f"bytes=0-{8 * MIB - 1}"]


def test_remote_gguf_header_doubles_the_range_until_the_header_fits(src):
    local = read_gguf_header(src / "tiny.gguf")
    assert local.data_offset > 16 << 10  # the header needs several doublings of 1 KiB
    with static_server(src) as server:
        resolved = resolve_source(HttpSource(server.file_url("tiny.gguf")))
        remote = read_remote_gguf_header(resolved, first_bytes=1024)
    ranges = server.ranges()
    assert ranges[:3] == ["bytes=0-1023", "bytes=0-2047", "bytes=0-4095"]
    assert int(ranges[-1].rsplit("-", 1)[1]) + 1 < 2 * local.data_offset  # stopped once it fit
    assert _same_header(remote, local)


def test_remote_gguf_header_longer_than_the_limit_is_a_truncation_error(src):
    with static_server(src) as server:
        resolved = resolve_source(HttpSource(server.file_url("tiny.gguf")))
        with pytest.raises(GGUFTruncated, match="truncated"):
            read_remote_gguf_header(resolved, first_bytes=1024, max_bytes=4096)
    assert server.ranges() == ["bytes=0-1023", "bytes=0-2047", "bytes=0-4095"]


def test_remote_gguf_header_of_a_file_that_is_not_gguf_is_an_error(src):
    with static_server(src) as server:
        with pytest.raises(GGUFError, match="not a GGUF file"):
            read_remote_gguf_header(resolve_source(HttpSource(server.file_url("m.gguf"))))


def test_remote_gguf_header_of_an_hf_file_is_read_with_the_token(src, hub_env):
    local = read_gguf_header(src / "tiny.gguf")
    with fake_hf_endpoint({(REPO, "main", "tiny.gguf"): src / "tiny.gguf"}, token=TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        remote = read_remote_gguf_header(resolve_source(parse_url(f"hf://{REPO}/tiny.gguf")))
    assert _same_header(remote, local)
    assert [r.method for r in hub.resolves] == ["HEAD", "GET"]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.resolves)


@pytest.mark.parametrize("cut", [4, 23, 24, 100, 1000])
def test_a_prefix_shorter_than_the_header_is_truncated_and_the_whole_file_parses(src, cut):
    data = (src / "tiny.gguf").read_bytes()
    with pytest.raises(GGUFTruncated, match="truncated"):
        parse_gguf_prefix(data[:cut], "tiny", len(data))
    assert parse_gguf_prefix(data, "tiny", len(data)) == dataclasses.replace(
        read_gguf_header(src / "tiny.gguf"), path="tiny")


def test_a_whole_file_whose_header_is_cut_short_is_an_error_even_as_a_prefix(src):
    data = (src / "tiny.gguf").read_bytes()[:1000]
    with pytest.raises(GGUFError, match="truncated"):
        parse_gguf_prefix(data, "cut.gguf", len(data))
