"""Transfers into a store: byte-exact, verified, resumed at the byte reached, never a half file
under a model's name. Real file servers on 127.0.0.1 with injected faults (tests/http_fixtures)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time

import pytest

from tests.http_fixtures import fake_hf_endpoint, static_server
from worker.store import ModelStore
from worker.transfer import Source, Transfer, TransferCancelled, TransferFailed, TransferSpec

KEY = "peer-key-0123456789"
MIB = 1 << 20
CUT = MIB + 12345  # where a dropping source closes the connection


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two different 3 MiB files served under the same name, from two directories."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for label in ("a", "b"):
        (root / label).mkdir()
        data = os.urandom(3 * MIB)
        (root / label / "m.gguf").write_bytes(data)
        out[label] = (root / label, data, hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "store")


def peer(server, label: str = "peer", name: str = "m.gguf") -> Source:
    return Source(label, server.file_url(name), {"Authorization": f"Bearer {KEY}"}, "copy")


def spec(*sources: Source, sha256: str | None = None, size: int | None = None, **kw) -> TransferSpec:
    return TransferSpec("t1", "m.gguf", tuple(sources), sha256=sha256, size_bytes=size, **kw)


def leftovers(store: ModelStore) -> list[str]:
    """What a transfer left in the store besides finished files and their sidecars."""
    return sorted(p.name for p in store.root.iterdir() if ".partial" in p.name)


def test_transfer_copies_a_file_byte_exactly_with_its_sha256(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY) as server:
        transfer = Transfer(store, spec(peer(server), sha256=sha, size=len(data)))
        stored = transfer.run()
    assert (store.root / "m.gguf").read_bytes() == data
    assert stored.sha256 == sha and stored.size_bytes == len(data) and stored.copied_by_homefleet
    assert server.ranges() == [None]
    done = transfer.progress()
    assert (done.state, done.bytes_done, done.total_bytes, done.sha256) == ("done", len(data), len(data), sha)
    assert leftovers(store) == []


def test_transfer_without_an_expected_sha256_records_the_one_computed_while_streaming(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY) as server:
        stored = Transfer(store, spec(peer(server))).run()
    assert stored.sha256 == sha
    assert store.describe(store.root / "m.gguf").sha256 == sha  # kept in the sidecar, not rehashed


def test_a_source_that_drops_mid_file_hands_over_to_the_next_at_the_byte_reached(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, drop_after_bytes=CUT) as first, static_server(src, key=KEY) as second:
        stored = Transfer(store, spec(peer(first, "one"), peer(second, "two"), sha256=sha, size=len(data))).run()
    assert first.ranges() == [None]
    assert second.ranges() == [f"bytes={CUT}-"]
    assert stored.sha256 == sha and (store.root / "m.gguf").read_bytes() == data


def test_a_source_that_ignores_the_range_restarts_the_file_from_its_first_byte(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, drop_after_bytes=CUT) as first, \
            static_server(src, key=KEY, ignore_range=True) as second:
        transfer = Transfer(store, spec(peer(first), peer(second), sha256=sha, size=len(data)))
        stored = transfer.run()
    assert second.ranges() == [f"bytes={CUT}-"]  # asked for the rest, got (and took) the whole file
    assert stored.sha256 == sha and transfer.progress().attempt == 1


def test_a_failed_restart_from_byte_zero_leaves_the_next_source_starting_from_zero_too(store, files):
    """A source that ignored the Range truncated the partial, then failed: the next source
    must not be asked for the old offset (that would leave a hole of zeros in the file)."""
    src_a, data, sha = files["a"]
    other_size = files["b"][0] / "short"
    other_size.mkdir(exist_ok=True)
    (other_size / "m.gguf").write_bytes(data[: len(data) // 2])
    with static_server(src_a, key=KEY, drop_after_bytes=CUT) as first, \
            static_server(other_size, key=KEY, ignore_range=True) as wrong_size, \
            static_server(src_a, key=KEY) as third:
        transfer = Transfer(store, spec(peer(first), peer(wrong_size), peer(third), sha256=sha, size=len(data)))
        stored = transfer.run()
    assert third.ranges() == [None]
    assert stored.sha256 == sha and transfer.progress().attempt == 1


def test_an_interrupted_transfer_resumes_from_its_partial_for_the_same_sha256(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, drop_after_bytes=CUT) as server:
        with pytest.raises(TransferFailed, match="no source could deliver"):
            Transfer(store, spec(peer(server), sha256=sha, size=len(data))).run()
        assert store.partial_path("m.gguf").stat().st_size == CUT
        assert not (store.root / "m.gguf").exists()  # no half file under the model's name
        stored = Transfer(store, spec(peer(server), sha256=sha, size=len(data))).run()
    assert server.ranges() == [None, f"bytes={CUT}-"]
    assert stored.sha256 == sha and (store.root / "m.gguf").read_bytes() == data
    assert leftovers(store) == []


def test_a_partial_that_belongs_to_another_sha256_is_discarded(store, files):
    src_a, data_a, sha_a = files["a"]
    src_b, data_b, sha_b = files["b"]
    with static_server(src_a, key=KEY, drop_after_bytes=CUT) as server_a:
        with pytest.raises(TransferFailed):
            Transfer(store, spec(peer(server_a), sha256=sha_a, size=len(data_a))).run()
    assert store.partial_path("m.gguf").exists()
    with static_server(src_b, key=KEY) as server_b:
        stored = Transfer(store, spec(peer(server_b), sha256=sha_b, size=len(data_b))).run()
    assert server_b.ranges() == [None]
    assert stored.sha256 == sha_b and (store.root / "m.gguf").read_bytes() == data_b


@pytest.mark.parametrize("same_url, expected_ranges", [(True, [None, f"bytes={CUT}-"]), (False, [None, None])])
def test_without_a_sha256_a_partial_resumes_only_for_the_same_url_and_size(store, files, same_url, expected_ranges):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, drop_after_bytes=CUT) as server:
        with pytest.raises(TransferFailed):
            Transfer(store, spec(peer(server), size=len(data))).run()
        url = server.file_url("m.gguf") + ("" if same_url else "?mirror=2")
        stored = Transfer(store, spec(Source("peer", url, {"Authorization": f"Bearer {KEY}"}), size=len(data))).run()
    assert server.ranges() == expected_ranges
    assert stored.sha256 == sha


def test_bytes_that_never_match_the_sha256_fail_after_max_attempts_and_leave_nothing(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, wrong_bytes=True) as server:
        transfer = Transfer(store, spec(peer(server), sha256=sha, size=len(data), max_attempts=2))
        with pytest.raises(TransferFailed, match="sha256") as failed:
            transfer.run()
    assert len(server.gets()) == 2
    assert "attempt 2" in str(failed.value)
    assert not (store.root / "m.gguf").exists() and store.files() == []
    assert leftovers(store) == []
    assert transfer.progress().state == "failed" and "sha256" in transfer.progress().error


@contextlib.contextmanager
def small_tmpfs(path, size: str = "8m"):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs to fill a disk (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_that_fills_up_fails_the_transfer_with_disk_full_and_removes_the_partial(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(12 * MIB)  # more than the 8 MiB volume
    (src / "m.gguf").write_bytes(data)
    with small_tmpfs(tmp_path / "small") as mnt:
        store = ModelStore(mnt / "store")
        with static_server(src, key=KEY) as server:
            # Size unknown beforehand, so the check before fetching cannot refuse it: the disk fills.
            transfer = Transfer(store, spec(peer(server)))
            with pytest.raises(TransferFailed, match="disk full"):
                transfer.run()
        assert leftovers(store) == []
        assert not (store.root / "m.gguf").exists()
        assert transfer.progress().state == "failed"


def test_not_enough_declared_disk_fails_before_any_byte_is_fetched(tmp_path, files):
    src, data, sha = files["a"]
    store = ModelStore(tmp_path / "store", declared_disk_free_bytes=len(data) - 1)
    with static_server(src, key=KEY) as server:
        with pytest.raises(TransferFailed, match="not enough disk"):
            Transfer(store, spec(peer(server), sha256=sha, size=len(data))).run()
    assert server.requests == []
    assert list(store.root.iterdir()) == []


def test_keep_free_disk_is_counted_in_the_check_before_fetching(tmp_path, files):
    src, data, sha = files["a"]
    store = ModelStore(tmp_path / "store", declared_disk_free_bytes=len(data) + MIB)
    with static_server(src, key=KEY) as server:
        with pytest.raises(TransferFailed, match="kept free"):
            Transfer(store, spec(peer(server), sha256=sha, size=len(data), keep_free_disk_bytes=2 * MIB)).run()
        assert Transfer(store, spec(peer(server), sha256=sha, size=len(data))).run().sha256 == sha


def _run_in_thread(transfer: Transfer) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(transfer.run())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_cancel_mid_transfer_stops_it_and_removes_the_partial(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY, chunk_bytes=16 << 10, chunk_delay_s=0.005) as slow:
        transfer = Transfer(store, spec(peer(slow, "slow-peer"), sha256=sha, size=len(data)))
        thread, outcome = _run_in_thread(transfer)
        _wait_for(lambda: transfer.progress().bytes_done > 0)
        moving = transfer.progress()
        assert (moving.state, moving.source, moving.total_bytes) == ("copying", "slow-peer", len(data))
        assert 0 < moving.bytes_done < len(data)
        transfer.cancel()
        thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], TransferCancelled)
    assert transfer.progress().state == "cancelled"
    assert leftovers(store) == [] and not (store.root / "m.gguf").exists()


def test_cancel_interrupts_the_wait_of_a_rate_limited_transfer(store, files):
    src, data, sha = files["a"]
    with static_server(src, key=KEY) as server:
        transfer = Transfer(store, spec(peer(server), sha256=sha, size=len(data), rate_limit_bytes_per_s=MIB))
        thread, outcome = _run_in_thread(transfer)
        _wait_for(lambda: transfer.progress().bytes_done > 0)
        started = time.monotonic()
        transfer.cancel()
        thread.join(10)
    assert time.monotonic() - started < 1.0  # not the seconds the rate limit had left
    assert isinstance(outcome[0], TransferCancelled) and leftovers(store) == []


def test_progress_reports_bytes_done_total_state_and_source(store, files):
    src, data, sha = files["a"]
    seen = []
    with static_server(src, key=KEY) as server:
        source = Source("http://example.invalid/m.gguf", server.file_url("m.gguf"),
                        {"Authorization": f"Bearer {KEY}"}, "download")
        Transfer(store, spec(source, sha256=sha, size=len(data)), on_progress=seen.append).run()
    states = [p.state for p in seen]
    assert states[0] == "queued"
    assert "downloading" in states and "verifying" in states and states[-1] == "done"
    assert states.index("downloading") < states.index("verifying") < states.index("done")
    assert all(p.kind == "download" and p.transfer_id == "t1" for p in seen)
    assert seen[-1].bytes_done == seen[-1].total_bytes == len(data)
    assert seen[-1].percent == 100.0 and not seen[-1].active
    downloading = [p for p in seen if p.state == "downloading"]
    assert downloading[-1].source == "http://example.invalid/m.gguf" and downloading[-1].total_bytes == len(data)


def test_a_redirect_to_another_host_does_not_carry_the_authorization(store, tmp_path, files):
    src, data, sha = files["a"]
    with fake_hf_endpoint({("me/repo", "main", "m.gguf"): src / "m.gguf"}, cdn=True) as hub:
        url = hub.resolve_url("me/repo", "m.gguf")
        source = Source("hf://me/repo/m.gguf", url, {"authorization": "Bearer hf_secret", "user-agent": "t"},
                        "download")
        stored = Transfer(store, spec(source, sha256=sha, size=len(data))).run()
    assert [r.authorization for r in hub.resolves] == ["Bearer hf_secret"]
    assert [r.authorization for r in hub.cdn.gets()] == [None]
    assert stored.sha256 == sha
