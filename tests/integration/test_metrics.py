"""Metrics and events of a real `homefleet up` (the demo model, the real engine): `/metrics`
read with prometheus_client's parser moves by exactly what a streamed and a whole chat
request did; the event log shows the model placed and loaded, at `GET /api/events` and in
`homefleet events`, and `homefleet events --follow` prints an unload as it happens."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.demo import DEMO_MODEL_NAME
from tests.support import child_env, homefleet_command, homefleet_up

pytestmark = pytest.mark.integration
COUNTING = "Count from 1 to 30, separated by commas: 1, 2, 3,"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    with homefleet_up(tmp) as running:  # no config: the demo model
        running.wait_for_models({DEMO_MODEL_NAME: {"ready"}})
        yield running


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(parsed: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and wanted <= ls)


def chat(url: str, stream: bool) -> httpx.Response:
    body = {"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": COUNTING}], "max_tokens": 12,
            "temperature": 0, "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def streamed_usage(response: httpx.Response) -> dict:
    """The usage of a stream: its last chunk carries it."""
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "usage" in chunks[-1], response.text[-1500:]
    return chunks[-1]["usage"]


def replica_tokens(url: str) -> tuple[int, int]:
    view = httpx.get(f"{url}/api/cluster", timeout=30).json()
    [model] = [m for m in view["models"] if m["name"] == DEMO_MODEL_NAME]
    return (sum(r["prompt_tokens"] for r in model["replicas"]), sum(r["completion_tokens"] for r in model["replicas"]))


def test_a_streamed_and_a_whole_request_move_the_histograms_and_token_counters_by_what_they_did(server):
    before, tokens_before = scrape(server.url), replica_tokens(server.url)
    streamed = chat(server.url, stream=True)
    whole = chat(server.url, stream=False)
    assert streamed.status_code == 200 and whole.status_code == 200, (streamed.text, whole.text)
    usages = [streamed_usage(streamed), whole.json()["usage"]]
    after = scrape(server.url)
    node = streamed.headers["x-homefleet-node"]
    where = {"model": DEMO_MODEL_NAME, "node": node}

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("homefleet_requests_total", status="200", **where) == 2
    assert moved("homefleet_request_duration_seconds_count", **where) == 2
    assert moved("homefleet_time_to_first_token_seconds_count", **where) == 1  # the streamed one only
    assert moved("homefleet_time_per_output_token_seconds_count", **where) == (1 if usages[0]["completion_tokens"] > 1
                                                                               else 0)
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert completion > 2
    assert moved("homefleet_prompt_tokens_total", model=DEMO_MODEL_NAME) == prompt
    assert moved("homefleet_completion_tokens_total", model=DEMO_MODEL_NAME) == completion
    # The first token comes before the last: a time to first token no longer than the request.
    assert 0 < moved("homefleet_time_to_first_token_seconds_sum", **where) < moved(
        "homefleet_request_duration_seconds_sum", **where)
    tokens_after = replica_tokens(server.url)
    assert (tokens_after[0] - tokens_before[0], tokens_after[1] - tokens_before[1]) == (prompt, completion)
    # The load that made it ready, and the machine it runs on.
    assert total(after, "homefleet_model_load_duration_seconds_count", **where) >= 1
    assert total(after, "homefleet_node_up", node=node) == 1
    assert total(after, "homefleet_node_ram_total_bytes", node=node) > 0
    assert total(after, "homefleet_replica_slots", model=DEMO_MODEL_NAME) >= 1
    assert total(after, "homefleet_replica_threads", model=DEMO_MODEL_NAME) >= 1  # alone: all its threads


def test_the_event_log_shows_the_model_placed_then_loaded_with_ids(server):
    page = httpx.get(f"{server.url}/api/events", timeout=30).json()
    ours = [e for e in page["events"] if e["model"] == DEMO_MODEL_NAME]
    kinds = [e["kind"] for e in ours]
    assert "placed" in kinds and "loaded" in kinds and kinds.index("placed") < kinds.index("loaded"), ours
    loaded = next(e for e in ours if e["kind"] == "loaded")
    assert loaded["node"] and "ready in" in loaded["reason"]
    ids = [e["id"] for e in page["events"]]
    assert ids == sorted(ids) and page["last_id"] == ids[-1]
    assert httpx.get(f"{server.url}/api/events", params={"since": page["last_id"]}, timeout=30).json()["events"] == []


def test_homefleet_events_prints_the_load(server):
    printed = subprocess.run(homefleet_command("events", "--url", server.url), env=child_env(), capture_output=True,
                             text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    [line] = [line for line in printed.stdout.splitlines() if " loaded " in line]
    assert DEMO_MODEL_NAME in line and "ready in" in line


def test_homefleet_events_follow_prints_an_unload_as_it_happens(server):
    follow = subprocess.Popen(homefleet_command("events", "--url", server.url, "--follow", "--limit", "0",
                                                "--interval", "0.3"),
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # it has started and asked once
        unload = httpx.post(f"{server.url}/api/models/{DEMO_MODEL_NAME}/unload", timeout=60)
        assert unload.status_code == 200, unload.text
        time.sleep(3)
    finally:
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and " unloaded " in lines[0] and DEMO_MODEL_NAME in lines[0], out
