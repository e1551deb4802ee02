"""The store's file server: whole files and single ranges, by name only, behind a bearer key."""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from worker.file_server import FileServer
from worker.store import ModelStore

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


DATA = os.urandom(3 << 20)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("store") / "models")
    (store.root / "m.gguf").write_bytes(DATA)
    return store


@pytest.fixture(scope="module")
def server(store):
    server = FileServer("127.0.0.1", 0, store.path_of, KEY).start()
    yield server
    server.stop()


def test_get_serves_the_whole_file_byte_exactly(server):
    r = httpx.get(f"{server.url}/files/m.gguf", headers=AUTH)
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["Content-Length"] == str(len(DATA)) and r.headers["Accept-Ranges"] == "bytes"


def test_head_gives_the_size_without_a_body(server):
    r = httpx.head(f"{server.url}/files/m.gguf", headers=AUTH)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(DATA)) and r.content == b""


@pytest.mark.parametrize("wanted, start, end", [
    ("bytes=100-199", 100, 199),
    ("bytes=1000000-", 1000000, len(DATA) - 1),
    (f"bytes=5-{len(DATA) + 100}", 5, len(DATA) - 1),  # an end past the file is clipped
    (f"bytes={len(DATA) - 1}-", len(DATA) - 1, len(DATA) - 1),
])
def test_range_get_answers_206_with_content_range_and_those_bytes(server, wanted, start, end):
    r = httpx.get(f"{server.url}/files/m.gguf", headers={**AUTH, "Range": wanted})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert r.content == DATA[start : end + 1]


@pytest.mark.parametrize("wanted", [f"bytes={len(DATA)}-", "bytes=200-100", "bytes=-100", "bytes=0-1,5-9", "lines=1-2"])
def test_unsatisfiable_or_unsupported_range_answers_416_with_the_size(server, wanted):
    r = httpx.get(f"{server.url}/files/m.gguf", headers={**AUTH, "Range": wanted})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_missing_or_wrong_key_answers_401(server, headers):
    r = httpx.get(f"{server.url}/files/m.gguf", headers=headers)
    assert r.status_code == 401
    assert DATA[:64] not in r.content


@pytest.mark.parametrize("path", ["/files/..", "/files/%2E%2E", "/files/..%2Fm.gguf", "/files/unknown.gguf",
                                  "/files/.m.gguf.homefleet.json", "/files/", "/m.gguf", "/files/sub%2Fm.gguf"])
def test_names_that_are_not_files_of_the_store_answer_404(server, path):
    assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 404


def test_a_symlink_out_of_the_store_answers_404(server, store, tmp_path):
    secret = tmp_path / "secret.gguf"  # outside the store's directory
    secret.write_bytes(b"outside the store")
    (store.root / "escape.gguf").symlink_to(secret)
    r = httpx.get(f"{server.url}/files/escape.gguf", headers=AUTH)
    assert r.status_code == 404 and b"outside the store" not in r.content


def test_one_client_connection_serves_several_requests_in_a_row(server):
    with httpx.Client(headers=AUTH) as client:
        parts = [client.get(f"{server.url}/files/m.gguf", headers={"Range": f"bytes={i}-{i + 9}"}).content
                 for i in range(0, 50, 10)]
        assert client.get(f"{server.url}/files/nope.gguf").status_code == 404
        assert client.get(f"{server.url}/files/m.gguf").content == DATA
    assert b"".join(parts) == DATA[:50]


def test_a_server_that_never_started_stops_without_hanging(store):
    stopping = threading.Thread(target=FileServer("127.0.0.1", 0, store.path_of, KEY).stop, daemon=True)
    stopping.start()
    stopping.join(5)
    assert not stopping.is_alive()
