"""worker/thread_binding.py: when llama.cpp's threads are bound one to a core."""

from __future__ import annotations

import sys

from worker.thread_binding import bind_threads_if_whole_machine, should_bind, usable_cpus


def test_threads_covering_every_core_are_bound():
    assert should_bind(2, 2, {}, library_loaded=False)
    assert should_bind(8, 4, {}, library_loaded=False)


def test_fewer_threads_than_cores_are_left_to_the_kernel():
    # e.g. 8 physical cores of 16 logical CPUs: other replicas on the node may need the rest
    assert not should_bind(8, 16, {}, library_loaded=False)


def test_the_users_own_setting_wins_and_a_loaded_library_is_too_late():
    assert not should_bind(2, 2, {"OMP_PROC_BIND": "false"}, library_loaded=False)
    assert not should_bind(2, 2, {}, library_loaded=True)


def test_binding_sets_the_environment_before_llama_cpp_loads(monkeypatch):
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    env: dict[str, str] = {}
    assert bind_threads_if_whole_machine(usable_cpus(), env)
    assert env == {"OMP_PROC_BIND": "true"}
    env = {}
    if usable_cpus() > 1:
        assert not bind_threads_if_whole_machine(usable_cpus() - 1, env)
        assert env == {}


def test_it_reports_the_users_setting_without_changing_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    env = {"OMP_PROC_BIND": "close"}
    assert bind_threads_if_whole_machine(usable_cpus(), env)
    assert env == {"OMP_PROC_BIND": "close"}
    env = {"OMP_PROC_BIND": "FALSE"}
    assert not bind_threads_if_whole_machine(usable_cpus(), env)


def test_once_llama_cpp_is_loaded_nothing_is_set(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", object())
    env: dict[str, str] = {}
    assert not bind_threads_if_whole_machine(usable_cpus(), env)
    assert env == {}
