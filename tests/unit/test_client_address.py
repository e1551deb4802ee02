"""Who a request comes from, and whether keyless loopback access is for it: trusted proxies'
X-Forwarded-For, the Host check against DNS rebinding and the Origin check against
cross-site posts. Tables for the pure functions, then the rules through the real app."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.config import ConfigError, parse_config
from orchestrator.gateway.app import create_app
from orchestrator.gateway.client_address import (
    client_address,
    host_name,
    is_local_name,
    local_names,
    origin_is_local,
    parse_networks,
)
from tests.unit.test_admin_api import AdminFakeController
from tests.unit.test_gateway_fakes import LAN_PEER, LOOPBACK, MODEL, FakeReplicaHandle

KEY = "sk-home-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
PROXY = ("10.0.0.5", 40000)
TRUSTED = parse_networks(["10.0.0.5", "127.0.0.1"])


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("192.168.1.20", ["127.0.0.1"], "192.168.1.20"),        # not a proxy: its header is ignored
    ("10.0.0.5", ["192.168.1.20"], "192.168.1.20"),         # a trusted proxy names the client
    ("10.0.0.5", [], "10.0.0.5"),                           # ... or, naming none, is the client
    ("10.0.0.5", ["127.0.0.1, 192.168.1.20"], "192.168.1.20"),  # a client's own claim on the left is not read
    ("10.0.0.5", ["192.168.1.20, 127.0.0.1"], "192.168.1.20"),  # past a trusted hop, right to left
    ("10.0.0.5", ["192.168.1.20", "127.0.0.1"], "192.168.1.20"),  # the header twice: one list
    ("10.0.0.5", ["unknown"], "unknown"),                   # not an address: not loopback either
    ("10.0.0.5", ["[::1]:5000"], "::1"),
    ("10.0.0.5", ["127.0.0.1"], "127.0.0.1"),               # a local client behind the proxy
])
def test_forwarded_for_is_read_only_from_trusted_proxies(peer, forwarded, expected):
    assert client_address(peer, forwarded, TRUSTED) == expected


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_address("127.0.0.1", ["192.168.1.20"], ()) == "127.0.0.1"


def test_a_trusted_network_covers_its_addresses():
    assert client_address("10.1.2.3", ["8.8.8.8"], parse_networks(["10.0.0.0/8"])) == "8.8.8.8"


@pytest.mark.parametrize("header, name", [
    ("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
    ("Evil.Example:80", "evil.example"), ("desktop.", "desktop"),
])
def test_host_name_is_the_name_part_in_lower_case(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("name, local", [
    ("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("app.localhost", True),
    ("desktop", True),  # this machine's name
    ("evil.example", False), ("localhost.evil.example", False), ("192.168.1.10", False), ("0.0.0.0", False),
    ("", False),
])
def test_local_names_are_loopback_localhost_and_this_machine(name, local):
    assert is_local_name(name, frozenset({"desktop"})) is local


def test_a_wildcard_bind_address_is_no_local_name():
    assert local_names("0.0.0.0", "Desktop") == frozenset({"desktop"})
    assert local_names("192.168.1.10", None) == frozenset({"192.168.1.10"})


@pytest.mark.parametrize("origin, allowed, local", [
    ("http://127.0.0.1:8000", (), True), ("http://localhost:3000", (), True), ("http://[::1]:8000", (), True),
    ("https://evil.example", (), False), ("null", (), False),
    ("https://chat.example", ("https://chat.example",), True), ("https://evil.example", ("*",), True),
])
def test_origin_is_local_for_local_pages_and_configured_origins(origin, allowed, local):
    assert origin_is_local(origin, frozenset(), allowed) is local


def test_trusted_proxies_must_be_addresses_and_the_error_names_the_entry():
    assert parse_config({"gateway": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/24"]}}).gateway.trusted_proxies
    with pytest.raises(ConfigError, match=r"gateway.trusted_proxies.*'proxy.lan'"):
        parse_config({"gateway": {"trusted_proxies": ["proxy.lan"]}})


# ----------------------------------------------------------------------------- through the app


def app_with(api_key: str | None = KEY, admin_key: str | None = ADMIN_KEY, **gateway):
    controller = AdminFakeController(MODEL, gateway=gateway)
    controller.add_replica(MODEL, FakeReplicaHandle())
    return create_app(controller, controller.config, api_key=api_key, admin_key=admin_key)


def client(app, peer, host: str = "localhost:8000") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=peer), base_url=f"http://{host}")


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
async def test_keyless_loopback_requests_to_a_local_host_are_served(host):
    async with client(app_with(), LOOPBACK, host) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await c.get("/v1/models")).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/api/cluster", "GET"), (f"/api/models/{MODEL}/unload", "POST")])
async def test_a_rebound_name_gets_no_keyless_loopback_access(path, method):
    # evil.example resolved to 127.0.0.1: the browser reaches loopback but sends its own Host.
    async with client(app_with(), LOOPBACK, "evil.example:8000") as c:
        response = await c.request(method, path, json=CHAT if method == "POST" else None)
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "host_not_allowed" and error["type"] == "invalid_request_error"
    assert "evil.example" in error["message"]


@pytest.mark.anyio
async def test_with_the_key_any_host_is_served_on_loopback():
    async with client(app_with(), LOOPBACK, "evil.example:8000") as c:
        assert (await c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
        admin = await c.post(f"/api/models/{MODEL}/unload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code == 200
        # The API key does not open admin operations under a foreign name.
        api = await c.post(f"/api/models/{MODEL}/unload", headers={"Authorization": f"Bearer {KEY}"})
        assert api.status_code == 403


@pytest.mark.anyio
async def test_the_configured_host_is_a_local_name():
    async with client(app_with(host="homelab.lan"), LOOPBACK, "homelab.lan:8000") as c:
        assert (await c.get("/v1/models")).status_code == 200


@pytest.mark.anyio
async def test_a_request_without_a_host_header_counts_as_local():
    # HTTP/1.0 clients may send none; a browser always sends one.
    app = app_with()
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.0", "method": "GET", "scheme": "http",
             "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"", "client": LOOPBACK,
             "server": ("127.0.0.1", 8000), "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200


@pytest.mark.anyio
@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
async def test_a_foreign_page_gets_no_keyless_loopback_access(origin):
    # A cross-site form posts to http://127.0.0.1:8000 with the right Host and its own Origin.
    async with client(app_with(), LOOPBACK, "127.0.0.1:8000") as c:
        response = await c.post(f"/api/models/{MODEL}/unload", headers={"Origin": origin})
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.anyio
async def test_local_pages_and_configured_origins_keep_keyless_loopback_access():
    async with client(app_with(cors_origins=["https://chat.example"]), LOOPBACK, "127.0.0.1:8000") as c:
        for origin in ("http://127.0.0.1:8000", "http://localhost:3000", "https://chat.example"):
            assert (await c.get("/v1/models", headers={"Origin": origin})).status_code == 200, origin


@pytest.mark.anyio
async def test_probes_and_the_dashboard_stay_public_under_any_host():
    async with client(app_with(), LOOPBACK, "evil.example") as c:
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.anyio
async def test_a_forwarded_loopback_address_from_an_untrusted_peer_is_ignored():
    async with client(app_with(), LAN_PEER) as c:
        response = await c.get("/v1/models", headers={"X-Forwarded-For": "127.0.0.1"})
    assert response.status_code == 401


@pytest.mark.anyio
async def test_behind_a_trusted_proxy_the_forwarded_client_is_checked():
    app = app_with(trusted_proxies=["10.0.0.5"])
    async with client(app, PROXY) as c:
        lan = await c.get("/v1/models", headers={"X-Forwarded-For": "192.168.1.20"})
        assert lan.status_code == 401  # a LAN client through the proxy needs the key
        keyed = await c.get("/v1/models", headers={"X-Forwarded-For": "192.168.1.20", "Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200
        local = await c.get("/v1/models", headers={"X-Forwarded-For": "127.0.0.1"})
        assert local.status_code == 200  # a local client through the proxy is local
        spoofed = await c.get("/v1/models", headers={"X-Forwarded-For": "127.0.0.1, 192.168.1.20"})
        assert spoofed.status_code == 401  # what the client claimed left of the proxy's entry is not read


@pytest.mark.anyio
async def test_a_trusted_proxy_on_loopback_does_not_make_its_clients_local():
    # nginx on the head's loopback in front of the gateway: LAN clients arrive from 127.0.0.1.
    async with client(app_with(trusted_proxies=["127.0.0.1"]), LOOPBACK) as c:
        assert (await c.get("/v1/models", headers={"X-Forwarded-For": "192.168.1.20"})).status_code == 401
        assert (await c.get("/v1/models")).status_code == 200  # a local program, straight to the gateway


def test_uvicorn_is_told_not_to_rewrite_the_client_from_forwarded_headers():
    from orchestrator.commands.up import server_config

    config = server_config(app_with(), parse_config({}))
    config.load()
    assert config.proxy_headers is False
