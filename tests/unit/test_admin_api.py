"""Runtime model management through the real app over a fake controller: load, unload and
reload of the config file; the admin key off loopback; the CLI that speaks it; SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from orchestrator.cli import build_parser
from orchestrator.config import HomefleetConfig
from orchestrator.config_reload import ConfigReloader, describe_reload
from orchestrator.gateway.app import create_app
from tests.unit.test_gateway_fakes import LAN_PEER, LOOPBACK, MODEL, FakeController, asgi_client
from worker.errors import RequestError

ADMIN_KEY = "sk-admin-0123456789"
API_KEY = "sk-home-0123456789"
GOOD_CONFIG = f"""
models:
  - {{name: {MODEL}, path: /m/{MODEL}.gguf, context: 2048}}
  - {{name: coder, path: /m/coder.gguf, context: 4096}}
"""


class AdminFakeController(FakeController):
    """The fake controller plus what the admin API uses: load_model, unload_model,
    reload_config (each records its calls) and config_path."""

    def __init__(self, *models: str, config_path: str | None = None, **config) -> None:
        super().__init__(*models, **config)
        self.config_path = config_path
        self.loads: list[tuple[str, bool]] = []
        self.unloads: list[str] = []
        self.reloads: list[HomefleetConfig] = []

    async def load_model(self, name: str, wait: bool = True) -> dict:
        self.loads.append((name, wait))
        if name not in self.models:
            raise RequestError(f"The model '{name}' does not exist", status=404, param="model",
                               code="model_not_found")
        return {"model": name, "state": "ready" if wait else "loading", "node": "desktop"}

    async def unload_model(self, name: str) -> dict:
        self.unloads.append(name)
        return {"model": name, "unloaded": [f"{name}#0"]}

    async def reload_config(self, config: HomefleetConfig) -> dict:
        self.reloads.append(config)
        old, new = set(self.models), {m.name for m in config.models}
        return {"added": sorted(new - old), "removed": sorted(old - new), "changed": [],
                "unchanged": sorted(old & new)}


def app_for(controller: AdminFakeController, api_key: str | None = None, admin_key: str | None = None):
    return create_app(controller, controller.config, api_key=api_key, admin_key=admin_key)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------- load, unload


@pytest.mark.anyio
async def test_load_waits_by_default_and_answers_the_controllers_summary():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post(f"/api/models/{MODEL}/load")
    assert response.status_code == 200
    assert response.json() == {"model": MODEL, "state": "ready", "node": "desktop"}
    assert controller.loads == [(MODEL, True)]


@pytest.mark.anyio
async def test_load_with_wait_false_is_handed_to_the_controller():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post(f"/api/models/{MODEL}/load", json={"wait": False})
    assert response.json()["state"] == "loading"
    assert controller.loads == [(MODEL, False)]


@pytest.mark.anyio
async def test_load_of_an_unknown_model_is_an_openai_shaped_404():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/api/models/nope/load")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.anyio
async def test_load_with_an_unknown_body_field_is_a_400_naming_it():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post(f"/api/models/{MODEL}/load", json={"wiat": False})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "wiat"
    assert controller.loads == []


@pytest.mark.anyio
async def test_unload_answers_the_replicas_it_stopped():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller)) as client:
        response = await client.post(f"/api/models/{MODEL}/unload")
    assert response.status_code == 200
    assert response.json() == {"model": MODEL, "unloaded": [f"{MODEL}#0"]}
    assert controller.unloads == [MODEL]


# ----------------------------------------------------------------------------- reload


@pytest.mark.anyio
async def test_reload_hands_the_reread_file_to_the_controller(tmp_path):
    path = tmp_path / "homefleet.yaml"
    path.write_text(GOOD_CONFIG)
    controller = AdminFakeController(config_path=str(path))
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/api/reload")
    assert response.status_code == 200
    assert response.json() == {"added": ["coder"], "removed": [], "changed": [], "unchanged": [MODEL],
                               "restart_needed": []}
    assert [m.name for m in controller.reloads[0].models] == [MODEL, "coder"]


@pytest.mark.anyio
async def test_reload_of_a_bad_config_is_a_400_naming_the_field_and_changes_nothing(tmp_path):
    path = tmp_path / "homefleet.yaml"
    path.write_text(f"models:\n  - {{name: {MODEL}, path: /m/x.gguf, contex: 2048}}\n")
    controller = AdminFakeController(config_path=str(path))
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/api/reload")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "models[0].contex: unknown field" in error["message"]
    assert error["code"] == "invalid_config"
    assert controller.reloads == []


@pytest.mark.anyio
async def test_reload_without_a_config_file_is_a_400_saying_up_runs_the_demo():
    controller = AdminFakeController(config_path=None)
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/api/reload")
    assert response.status_code == 400
    assert "runs the demo without a config file" in response.json()["error"]["message"]
    assert controller.reloads == []


@pytest.mark.anyio
async def test_reload_names_start_only_settings_that_changed_as_needing_a_restart(tmp_path):
    path = tmp_path / "homefleet.yaml"
    path.write_text("gateway: {port: 9000}\n" + GOOD_CONFIG)
    controller = AdminFakeController(config_path=str(path))
    async with asgi_client(app_for(controller)) as client:
        response = await client.post("/api/reload")
    assert response.json()["restart_needed"] == ["gateway.port"]


@pytest.mark.parametrize("summary, line", [
    ({"added": ["coder"], "removed": ["old"], "changed": ["chat"], "unchanged": []},
     "reloaded: added coder; removed old; changed chat"),
    ({"added": [], "removed": [], "changed": [], "unchanged": ["chat"]}, "reloaded: no model changed"),
    ({"added": ["a", "b"], "removed": [], "changed": [], "unchanged": [], "restart_needed": ["gateway.port"]},
     "reloaded: added a, b (gateway.port take effect at the next `homefleet up`)"),
])
def test_a_reload_is_told_in_one_line(summary, line):
    assert describe_reload(summary) == line


# ----------------------------------------------------------------------------- the admin key

ADMIN_CALLS = [
    ("POST", f"/api/models/{MODEL}/load", {"wait": True}),
    ("POST", f"/api/models/{MODEL}/unload", None),
    ("POST", "/api/reload", None),
    ("POST", "/api/pull", {"source": "https://example.com/m.gguf"}),
    ("POST", "/api/models/prune", {"dry_run": True}),
]


async def admin_call(client: httpx.AsyncClient, method: str, path: str, body: dict | None, headers=None):
    return await client.request(method, path, json=body, headers=headers or {})


@pytest.fixture
def reloadable(tmp_path) -> AdminFakeController:
    path = tmp_path / "homefleet.yaml"
    path.write_text(GOOD_CONFIG)
    return AdminFakeController(config_path=str(path))


@pytest.mark.anyio
@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
async def test_loopback_runs_admin_operations_without_any_key(reloadable, method, path, body):
    app = app_for(reloadable, api_key=API_KEY, admin_key=ADMIN_KEY)
    async with asgi_client(app, LOOPBACK) as client:
        response = await admin_call(client, method, path, body)
    assert response.status_code in (200, 202), response.text


@pytest.mark.anyio
@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
async def test_off_loopback_without_an_admin_key_set_admin_operations_are_a_403_saying_how(
        reloadable, method, path, body):
    app = app_for(reloadable, api_key=API_KEY)
    async with asgi_client(app, LAN_PEER) as client:
        response = await admin_call(client, method, path, body, bearer(API_KEY))
    assert response.status_code == 403
    error = response.json()["error"]
    assert "HOMEFLEET_ADMIN_KEY" in error["message"] and error["code"] == "admin_key_not_set"
    assert reloadable.loads == reloadable.unloads == reloadable.reloads == []


@pytest.mark.anyio
@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), bearer(API_KEY)], ids=["none", "wrong", "api-key"])
async def test_off_loopback_admin_operations_without_the_admin_key_are_a_401(reloadable, method, path, body, headers):
    app = app_for(reloadable, api_key=API_KEY, admin_key=ADMIN_KEY)
    async with asgi_client(app, LAN_PEER) as client:
        response = await admin_call(client, method, path, body, headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "admin key" in response.json()["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
@pytest.mark.parametrize("api_key", [API_KEY, None], ids=["api-key-set", "no-api-key"])
async def test_off_loopback_the_admin_key_opens_admin_operations(reloadable, method, path, body, api_key):
    app = app_for(reloadable, api_key=api_key, admin_key=ADMIN_KEY)
    async with asgi_client(app, LAN_PEER) as client:
        response = await admin_call(client, method, path, body, bearer(ADMIN_KEY))
    assert response.status_code in (200, 202), response.text


@pytest.mark.anyio
async def test_the_admin_key_is_no_api_key_for_other_operations():
    controller = AdminFakeController()
    async with asgi_client(app_for(controller, api_key=API_KEY, admin_key=ADMIN_KEY), LAN_PEER) as client:
        assert (await client.get("/v1/models", headers=bearer(ADMIN_KEY))).status_code == 401
        assert (await client.get("/v1/models", headers=bearer(API_KEY))).status_code == 200
        assert (await client.get("/api/transfers", headers=bearer(API_KEY))).status_code == 200


@pytest.mark.anyio
async def test_the_admin_key_comes_from_the_config_when_not_passed():
    controller = AdminFakeController(gateway={"admin_key": ADMIN_KEY})
    async with asgi_client(create_app(controller, controller.config), LAN_PEER) as client:
        response = await client.post(f"/api/models/{MODEL}/unload", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200


def test_the_openapi_document_names_the_admin_keys_401_and_403():
    document = app_for(AdminFakeController()).openapi()
    for path in ("/api/models/{name}/load", "/api/models/{name}/unload", "/api/reload", "/api/pull",
                 "/api/models/prune"):
        assert {"200", "401", "403"} <= set(document["paths"][path]["post"]["responses"]) or \
            {"202", "401", "403"} <= set(document["paths"][path]["post"]["responses"]), path
    assert "403" not in document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "400" in document["paths"]["/api/reload"]["post"]["responses"]


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("argv, expected", [
    (["load", "chat"], {"name": "chat", "wait": True, "url": None, "admin_key": None}),
    (["load", "chat", "--no-wait", "--url", "http://head:8000"], {"name": "chat", "wait": False,
                                                                   "url": "http://head:8000"}),
    (["unload", "chat", "--admin-key", "k"], {"name": "chat", "admin_key": "k"}),
    (["reload"], {"url": None, "admin_key": None}),
])
def test_load_unload_and_reload_parse_their_arguments(argv, expected):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.func.__name__ == f"run_{argv[0]}"


class Gateway:
    """A canned gateway for the CLI: records each request, answers `status` and `body`."""

    def __init__(self, status: int = 200, body: dict | None = None) -> None:
        self.status, self.body = status, body or {}
        self.requests: list[httpx.Request] = []

    @property
    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(self.status, json=self.body)

        return httpx.MockTransport(handle)


def run_cli(argv: list[str], gateway: Gateway) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, transport=gateway.transport)


def test_cli_load_posts_wait_and_the_admin_key_and_says_where_it_loaded(monkeypatch, capsys):
    monkeypatch.setenv("HOMEFLEET_ADMIN_KEY", ADMIN_KEY)
    gateway = Gateway(body={"model": "chat", "state": "ready", "node": "laptop-1"})
    assert run_cli(["load", "chat", "--url", "http://head:8000"], gateway) == 0
    request = gateway.requests[0]
    assert (request.method, str(request.url)) == ("POST", "http://head:8000/api/models/chat/load")
    assert request.headers["authorization"] == f"Bearer {ADMIN_KEY}"
    assert json.loads(request.content) == {"wait": True}
    assert capsys.readouterr().out.startswith("chat loaded on laptop-1 in ")


def test_cli_load_no_wait_says_the_state_it_started_in(capsys):
    gateway = Gateway(body={"model": "chat", "state": "copying", "node": "laptop-1"})
    assert run_cli(["load", "chat", "--no-wait"], gateway) == 0
    assert json.loads(gateway.requests[0].content) == {"wait": False}
    assert capsys.readouterr().out == "chat copying on laptop-1\n"


def test_cli_load_that_ends_failed_exits_nonzero_with_the_reason(capsys):
    gateway = Gateway(body={"model": "chat", "state": "failed", "node": None, "reason": "out of memory"})
    assert run_cli(["load", "chat"], gateway) == 1
    assert capsys.readouterr().err == "chat failed: out of memory\n"


def test_cli_errors_exit_nonzero_with_the_servers_message(capsys):
    gateway = Gateway(503, {"error": {"message": "laptop-1: needs 9.4 GiB VRAM, 5.1 GiB free",
                                      "type": "server_error", "param": None, "code": None}})
    assert run_cli(["load", "chat"], gateway) == 1
    assert "laptop-1: needs 9.4 GiB VRAM, 5.1 GiB free" in capsys.readouterr().err


def test_cli_refused_for_the_key_shows_the_servers_reason_and_the_admin_key_hint(capsys):
    gateway = Gateway(403, {"error": {"message": "Admin operations are served to loopback only",
                                      "type": "invalid_request_error", "param": None, "code": "admin_key_not_set"}})
    assert run_cli(["reload"], gateway) == 1
    err = capsys.readouterr().err
    assert "Admin operations are served to loopback only" in err and "HOMEFLEET_ADMIN_KEY" in err


def test_cli_unload_and_reload_print_one_line(capsys):
    assert run_cli(["unload", "chat"], Gateway(body={"model": "chat", "unloaded": ["chat#0"]})) == 0
    assert run_cli(["unload", "chat"], Gateway(body={"model": "chat", "unloaded": []})) == 0
    summary = {"added": ["coder"], "removed": ["old"], "changed": ["chat"], "unchanged": []}
    assert run_cli(["reload"], Gateway(body=summary)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "chat unloaded (chat#0)", "chat was not loaded", "reloaded: added coder; removed old; changed chat"]


# ----------------------------------------------------------------------------- SIGHUP


@pytest.mark.anyio
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads_the_config_file_and_a_bad_one_changes_nothing(tmp_path, caplog):
    from orchestrator.commands.up import _reload_on_hangup

    path = tmp_path / "homefleet.yaml"
    path.write_text(GOOD_CONFIG)
    controller = AdminFakeController(config_path=str(path))
    undo = _reload_on_hangup(ConfigReloader(controller))
    try:
        caplog.set_level("INFO", logger="homefleet")
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: controller.reloads)
        assert "SIGHUP: reloaded: added coder" in caplog.text
        path.write_text("models: [{name: x, path: /m/x.gguf, contex: 1}]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: "nothing changed" in caplog.text)
        assert "models[0].contex: unknown field" in caplog.text
        assert len(controller.reloads) == 1
    finally:
        undo()


async def _until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_up_takes_the_admin_key_from_the_environment_over_the_file(tmp_path, monkeypatch):
    from orchestrator.commands.up import resolve_config

    path = tmp_path / "homefleet.yaml"
    path.write_text("gateway: {admin_key: from-file}\n" + GOOD_CONFIG)
    args = build_parser().parse_args(["up", "--config", str(path)])
    monkeypatch.delenv("HOMEFLEET_ADMIN_KEY", raising=False)
    assert resolve_config(args).gateway.admin_key == "from-file"
    monkeypatch.setenv("HOMEFLEET_ADMIN_KEY", "from-env")
    assert resolve_config(args).gateway.admin_key == "from-env"

