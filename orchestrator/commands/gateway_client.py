"""Talking to a running gateway from the CLI: one call, errors in words fit for a terminal."""

from __future__ import annotations

import os

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 10.0


class GatewayError(Exception):
    """Why the gateway gave no answer we can use."""


ADMIN_KEY_HINT = "pass --admin-key or set HOMEFLEET_ADMIN_KEY"


def admin_key(flag: str | None = None) -> str | None:
    """The key for admin operations (load, unload, reload, pull, prune) off the head's loopback."""
    return flag or os.environ.get("HOMEFLEET_ADMIN_KEY") or None


def gateway_url(flag: str | None) -> str:
    return (flag or os.environ.get("HOMEFLEET_URL") or DEFAULT_URL).rstrip("/")


def call(url: str, method: str, path: str, api_key: str | None = None, body: dict | None = None,
         transport: httpx.BaseTransport | None = None, timeout_s: float = TIMEOUT_SECONDS,
         key_hint: str = "pass --api-key or set HOMEFLEET_API_KEY") -> dict:
    """The JSON answer of `method url+path`; GatewayError with a readable message otherwise
    (`key_hint`: what to do when the gateway refuses the key)."""
    api_key = api_key or os.environ.get("HOMEFLEET_API_KEY") or None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            response = client.request(method, f"{url}{path}", headers=headers, json=body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise GatewayError(f"no homefleet gateway at {url}: start one with `homefleet up`") from exc
    except httpx.HTTPError as exc:
        raise GatewayError(f"the gateway at {url} did not answer: {exc}") from exc
    if response.status_code in (401, 403):
        raise GatewayError(
            f"the gateway at {url} refused the request (HTTP {response.status_code}): "
            f"{error_message(response)} ({key_hint})"
        )
    if response.status_code >= 300:
        raise GatewayError(f"the gateway at {url} answered HTTP {response.status_code}: {error_message(response)}")
    try:
        return response.json()
    except ValueError as exc:
        raise GatewayError(f"{url}{path} did not answer with JSON: is this a homefleet gateway?") from exc


def error_message(response: httpx.Response) -> str:
    """OpenAI-shaped {"error": {"message": ...}} when the gateway sent one, else the body's start."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def fetch_view(url: str, api_key: str | None = None, transport: httpx.BaseTransport | None = None):
    """(raw JSON, ClusterView) of {url}/api/cluster; GatewayError when it is not a cluster view."""
    from pydantic import ValidationError

    from orchestrator.cluster_view import ClusterView

    payload = call(url, "GET", "/api/cluster", api_key, transport=transport)
    try:
        return payload, ClusterView.model_validate(payload)
    except ValidationError as exc:
        raise GatewayError(f"{url}/api/cluster did not answer with a cluster view:\n{exc}") from None
