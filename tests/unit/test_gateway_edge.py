"""The gateway's edge through the real app: the API key, the body limit, content types, CORS
and the OpenAPI document."""

from __future__ import annotations

import json

import pytest

from orchestrator.gateway.api_key import bearer_token
from tests.unit.test_gateway_fakes import (
    LAN_PEER,
    LOOPBACK,
    MODEL,
    FakeController,
    FakeReplicaHandle,
    app_for,
    asgi_client,
)

pytestmark = pytest.mark.anyio
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
KEY = "sk-home-0123456789"


def controller_with_replica(**config) -> tuple[FakeController, FakeReplicaHandle]:
    controller = FakeController(MODEL, **config)
    handle = FakeReplicaHandle()
    controller.add_replica(MODEL, handle)
    return controller, handle


# ----------------------------------------------------------------------------- API key


@pytest.mark.parametrize("header, expected", [
    ("Bearer abc", "abc"), ("bearer   abc  ", "abc"), ("BEARER abc", "abc"), ("Basic abc", ""), ("abc", ""), ("", ""),
])
def test_bearer_token_is_read_from_the_bearer_scheme_only(header, expected):
    assert bearer_token(header) == expected


@pytest.mark.parametrize("peer", [LOOPBACK, ("::1", 5000)])
async def test_loopback_peers_need_no_key(peer):
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller, api_key=KEY), peer) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"X-Forwarded-For": "127.0.0.1"}])
async def test_other_peers_without_the_right_bearer_key_get_401(headers):
    controller, handle = controller_with_replica()
    async with asgi_client(app_for(controller, api_key=KEY), LAN_PEER) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/v1/models", headers=headers)).status_code == 401
    assert handle.calls == []


async def test_other_peers_with_the_bearer_key_are_served():
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller, api_key=KEY), LAN_PEER) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer  {KEY} "})
        assert response.status_code == 200


async def test_without_a_key_configured_only_loopback_is_served_and_told_why():
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller), LAN_PEER) as client:
        response = await client.get("/v1/models", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 401 and "HOMEFLEET_API_KEY" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz"])
async def test_probes_and_the_dashboard_are_public(path):
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller, api_key=KEY), LAN_PEER) as client:
        assert (await client.get(path)).status_code == 200


# ----------------------------------------------------------------------------- body limit


async def test_a_body_declared_over_the_limit_is_a_413_before_it_is_read():
    controller, handle = controller_with_replica(gateway={"max_body_bytes": 4096})
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "4096" in error["message"] and str(len(body)) in error["message"]
    assert handle.calls == []


async def test_a_chunked_body_is_a_413_once_its_chunks_pass_the_limit():
    controller, handle = controller_with_replica(gateway={"max_body_bytes": 4096})
    chunks_read = []

    async def chunks():
        for index in range(100):
            chunks_read.append(index)
            yield b" " * 1000
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/v1/chat/completions", content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert len(chunks_read) < 10  # it stopped reading at the limit
    assert handle.calls == []


async def test_a_chunked_body_under_the_limit_is_served():
    controller, _ = controller_with_replica(gateway={"max_body_bytes": 4096})
    data = json.dumps(CHAT).encode()

    async def chunks():
        for i in range(0, len(data), 7):
            yield data[i:i + 7]
    async with asgi_client(app_for(controller)) as client:
        assert (await client.post("/v1/chat/completions", content=chunks())).status_code == 200


def test_the_default_limit_is_8_mib_and_cors_is_off():
    config = FakeController().config
    assert config.gateway.max_body_bytes == 8 * 1024 * 1024 and config.gateway.cors_origins == []


# ----------------------------------------------------------------------------- content types


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "application/json; charset=utf-8", "application/vnd.api+json"])
async def test_a_json_body_is_read_as_json_whatever_its_content_type(content_type):
    controller, handle = controller_with_replica()
    headers = {"content-type": content_type} if content_type else {}
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
    assert response.status_code == 200, response.text
    assert handle.calls[0][1][0] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, code", [(b'{"model": "x", "messages": [', "invalid_json"),
                                        (b"[1, 2]", "invalid_type"), (b"", "missing_required_parameter")])
async def test_a_body_that_is_not_a_json_object_is_a_400(body, code):
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 400 and response.json()["error"]["code"] == code


# ----------------------------------------------------------------------------- CORS

ORIGIN = "http://localhost:3000"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_is_off_by_default():
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_origins_open_the_endpoint_to_those_origins_even_off_loopback():
    controller, _ = controller_with_replica(gateway={"cors_origins": [ORIGIN]})
    async with asgi_client(app_for(controller, api_key=KEY), LAN_PEER) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
        answer = await client.post("/v1/chat/completions", json=CHAT,
                                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
        assert "x-homefleet-node" in answer.headers["access-control-expose-headers"]
        refused = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        other = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ----------------------------------------------------------------------------- the OpenAPI document


@pytest.fixture(scope="module")
def document() -> dict:
    return app_for(FakeController()).openapi()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_openapi_document_names_400_never_422(document):
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, method, operation in operations(document):
        assert "422" not in operation["responses"], (method, path)
        if "requestBody" in operation:
            assert {"400", "413"} <= set(operation["responses"]), (method, path)


def test_errors_are_documented_with_the_openai_error_schema(document):
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    # The Ollama surface answers its own errors in Ollama's shape (tests/unit/test_ollama_api.py).
    ollama_ref = {"$ref": "#/components/schemas/OllamaError"}
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")) and path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                ollama = "Ollama" in operation.get("tags", []) and status not in ("401", "413")
                assert schema == (ollama_ref if ollama else error_ref), (method, path, status)
    assert set(document["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_statuses_documented_where_they_happen(document):
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert {"200", "400", "401", "404", "413", "502", "503"} <= set(paths[path]["post"]["responses"])
        assert "Retry-After" in paths[path]["post"]["responses"]["503"]["headers"]
    assert {"200", "401", "404"} <= set(paths["/v1/models/{model_id}"]["get"]["responses"])
    assert "401" not in paths["/healthz"]["get"]["responses"]


def test_streams_metrics_and_the_dashboard_are_documented_as_served(document):
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert set(paths[path]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/"]["get"]["responses"]["200"]["content"]) == {"text/html"}


async def test_metrics_are_served_as_prometheus_text():
    controller, _ = controller_with_replica()
    async with asgi_client(app_for(controller)) as client:
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert f'homefleet_replica_ready{{model="{MODEL}"' in response.text
