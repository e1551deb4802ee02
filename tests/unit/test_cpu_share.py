"""worker/cpu_share.py: replicas of one machine split its cores while they decode at once."""

from __future__ import annotations

import subprocess
import sys

from worker.cpu_share import ROW, STALE_S, CpuBoard, place_offset, rotated_places, shared_threads
from worker.thread_binding import bind_threads_if_whole_machine, usable_cpu_list


def test_each_decoding_replica_takes_its_share_of_the_threads_and_at_least_one():
    assert shared_threads(8, 1) == 8
    assert shared_threads(8, 2) == 4
    assert shared_threads(8, 3) == 2
    assert shared_threads(2, 3) == 1
    assert shared_threads(1, 2) == 1


def test_replicas_start_their_threads_far_apart():
    assert [place_offset(i, 8) for i in range(4)] == [0, 4, 2, 6]
    assert [place_offset(i, 2) for i in range(2)] == [0, 1]
    assert place_offset(5, 1) == 0
    assert rotated_places([0, 1, 2, 3], 2) == "{2},{3},{0},{1}"


def test_two_replicas_get_their_own_rows_and_see_each_other_decode(tmp_path):
    a, b = CpuBoard(tmp_path / "board"), CpuBoard(tmp_path / "board")
    assert (a.claim(), b.claim()) == (0, 1)
    assert a.decoding(now=100.0) == 1  # b has not said it decodes
    assert b.decoding(now=100.0) == 2
    assert a.decoding(now=100.5) == 2  # a looks again after READ_EVERY_S
    b.idle()
    assert a.decoding(now=101.0) == 1
    b.release()
    assert CpuBoard(tmp_path / "board").claim() == 1  # the row b left


def test_a_row_not_renewed_does_not_count(tmp_path):
    a, b = CpuBoard(tmp_path / "board"), CpuBoard(tmp_path / "board")
    a.claim(), b.claim()
    b.decoding(now=100.0)  # then b hangs or dies without a word
    assert a.decoding(now=100.0 + STALE_S + 0.1) == 1


def test_the_row_of_a_replica_that_died_is_taken_again(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "board"
    first = CpuBoard(path)
    first.claim()
    ROW.pack_into(first._map, 0, gone.pid, 1, 1e12)  # a dead replica's row, decoding "now"
    assert CpuBoard(path).claim() == 0


def test_a_replica_with_no_row_decodes_alone():
    assert CpuBoard().decoding() == 1  # never claimed: as if it had the machine to itself


def test_bound_threads_of_a_later_replica_start_at_its_own_core(monkeypatch):
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    cpus = usable_cpu_list()
    env: dict[str, str] = {}
    assert bind_threads_if_whole_machine(len(cpus), env, first_core=1)
    if len(cpus) > 1:
        assert env["OMP_PLACES"] == rotated_places(cpus, 1)
    env = {"OMP_PLACES": "cores"}  # the user's own places win
    bind_threads_if_whole_machine(len(cpus), env, first_core=1)
    assert env == {"OMP_PLACES": "cores", "OMP_PROC_BIND": "true"}


def test_a_replica_that_died_while_decoding_stops_counting_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    a = CpuBoard(tmp_path / "board")
    a.claim()
    ROW.pack_into(a._map, 5 * ROW.size, gone.pid, 1, 100.0)  # said "decoding" just now, then died
    assert a.decoding(now=100.0) == 1
