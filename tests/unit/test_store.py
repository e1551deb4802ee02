"""The model store: hashes cached beside files, names only, copies never overwrite, prune only copies."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from orchestrator.core.model_source import alternate_name
from worker.store import ModelStore, StoreError, sidecar_path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _described(store: ModelStore, name: str):
    store.describe(store.root / name)
    store.wait_hashed(10)
    return store.describe(store.root / name)


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


def test_sha256_is_computed_in_the_background_and_kept_in_a_hidden_sidecar(store):
    data = os.urandom(300_000)
    path = _write(store.root / "a.gguf", data)
    first = store.describe(path)
    assert first.sha256 is None  # queued, not computed on the caller's thread
    store.wait_hashed(10)
    assert store.describe(path).sha256 == _sha(data)
    kept = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == ".a.gguf.homefleet.json"
    assert kept["sha256"] == _sha(data) and kept["size"] == len(data)
    assert [f.name for f in store.report().files] == ["a.gguf"]  # the sidecar is not a model


def test_cached_sha256_is_trusted_while_size_and_mtime_are_unchanged(store):
    data = os.urandom(100_000)
    path = _write(store.root / "a.gguf", data)
    _described(store, "a.gguf")
    meta = json.loads(sidecar_path(path).read_text())
    meta["sha256"] = "0" * 64  # proves the next answer comes from the sidecar, not a new hash
    sidecar_path(path).write_text(json.dumps(meta))
    for _ in range(3):
        assert store.describe(path).sha256 == "0" * 64
    store.wait_hashed(10)
    assert store.describe(path).sha256 == "0" * 64


def test_cached_sha256_is_recomputed_once_the_mtime_changes(store):
    data = os.urandom(100_000)
    path = _write(store.root / "a.gguf", data)
    _described(store, "a.gguf")
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "sha256": "0" * 64}))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    assert store.describe(path).sha256 is None
    assert _described(store, "a.gguf").sha256 == _sha(data)


def test_cached_sha256_is_recomputed_once_the_content_changes(store):
    path = _write(store.root / "a.gguf", b"first" * 1000)
    _described(store, "a.gguf")
    changed = b"other content, another size"
    path.write_bytes(changed)
    assert _described(store, "a.gguf").sha256 == _sha(changed)


@pytest.mark.parametrize("name", ["sub/a.gguf", "../a.gguf", "..", ".", ".a.gguf", ".a.gguf.homefleet.json",
                                  "/etc/passwd", "", "a b.gguf"])
def test_path_of_refuses_anything_but_a_plain_name(store, name):
    with pytest.raises(StoreError):
        store.path_of(name)


def test_path_of_refuses_a_symlink_that_leaves_the_store(store, tmp_path):
    outside = _write(tmp_path / "secret.gguf", b"not yours")
    (store.root / "link.gguf").symlink_to(outside)
    with pytest.raises(StoreError, match="leaves the store"):
        store.path_of("link.gguf")


def test_path_of_accepts_a_file_and_a_symlink_inside_the_store(store):
    _write(store.root / "a.gguf", b"x")
    (store.root / "b.gguf").symlink_to(store.root / "a.gguf")
    assert store.path_of("a.gguf") == store.root / "a.gguf"
    assert store.path_of("b.gguf") == store.root / "b.gguf"
    with pytest.raises(StoreError, match="not in the store"):
        store.path_of("missing.gguf")


def test_commit_never_overwrites_a_different_file_it_takes_the_alternate_name(store):
    user = b"the user's own file"
    _write(store.root / "m.gguf", user)
    copy = b"a different file with the same name"
    partial = _write(store.partial_path("m.gguf"), copy)
    stored = store.commit(partial, "m.gguf", _sha(copy))
    assert stored.name == alternate_name("m.gguf", _sha(copy)) == f"m-{_sha(copy)[:12]}.gguf"
    assert (store.root / "m.gguf").read_bytes() == user
    assert (store.root / stored.name).read_bytes() == copy
    assert stored.sha256 == _sha(copy) and stored.copied_by_homefleet
    assert not partial.exists()


def test_commit_reuses_an_identical_file_already_in_place(store):
    data = b"same bytes"
    _write(store.root / "m.gguf", data)
    partial = _write(store.partial_path("m.gguf"), data)
    stored = store.commit(partial, "m.gguf", _sha(data))
    assert stored.name == "m.gguf" and stored.sha256 == _sha(data)
    assert not partial.exists()
    assert not stored.copied_by_homefleet  # it stays the user's file
    assert sorted(p.name for p in store.files()) == ["m.gguf"]


def test_commit_marks_a_new_file_as_copied_and_remove_copy_deletes_it(store):
    data = os.urandom(1000)
    partial = _write(store.partial_path("m.gguf"), data)
    stored = store.commit(partial, "m.gguf", _sha(data))
    assert stored.copied_by_homefleet and stored.path == str(store.root / "m.gguf")
    assert store.remove_copy("m.gguf") == len(data)
    assert not (store.root / "m.gguf").exists()
    assert not sidecar_path(store.root / "m.gguf").exists()


def test_remove_copy_refuses_a_file_the_user_put_in_place(store):
    _write(store.root / "mine.gguf", b"user file")
    _described(store, "mine.gguf")
    with pytest.raises(StoreError, match="not copied here by homefleet"):
        store.remove_copy("mine.gguf")
    assert (store.root / "mine.gguf").exists()


def test_remove_copy_refuses_a_copy_the_user_has_since_changed(store):
    data = b"copied"
    stored = store.commit(_write(store.partial_path("m.gguf"), data), "m.gguf", _sha(data))
    (store.root / stored.name).write_bytes(b"edited by the user afterwards")
    with pytest.raises(StoreError):
        store.remove_copy("m.gguf")


def test_disk_usage_honours_a_declared_free_figure(tmp_path):
    measured_free, total = ModelStore(tmp_path / "a").disk_usage()
    assert measured_free is not None and total is not None
    declared = ModelStore(tmp_path / "b", declared_disk_free_bytes=12345)
    assert declared.disk_usage() == (12345, total)
    assert declared.report().disk_free_bytes == 12345
