"""The keys: the API key is asked of every address but loopback, the admin key of admin
operations from every address but loopback. The address is the socket's peer; a forwarded
header counts only when that peer is one of `gateway.trusted_proxies` (client_address.py).
A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide the client's disconnect
from the endpoints behind it.

Keyless loopback access is for local programs: a request without a valid key must name a
local host (`Host: localhost`, `127.0.0.1`, `[::1]`, the configured host or this machine's
name), else a page elsewhere could reach it through the user's browser by DNS rebinding; and
it must not come from a foreign web page (`Origin`), else a cross-site form could post to it.
Such a request is refused with 403; with the key, any Host and Origin are served.

On an admin path the admin key stands in for the API key: off loopback it is the one key
checked there (one `Authorization` header carries one key), and the API key alone does not
open it. Without an admin key configured, admin operations are refused off loopback (403).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from orchestrator.gateway.client_address import (
    Network,
    client_address,
    host_name,
    is_local_name,
    origin_is_local,
)
from orchestrator.gateway.errors import error_body

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
# Operations that change what the fleet serves or stores: (method, path pattern).
ADMIN_OPERATIONS = (
    ("POST", re.compile(r"/api/models/[^/]+/(load|unload)")),
    ("POST", re.compile(r"/api/reload")),
    ("POST", re.compile(r"/api/nodes/[^/]+/(drain|undrain)")),
    ("POST", re.compile(r"/api/pull")),
    ("POST", re.compile(r"/api/models/prune")),
    ("POST", re.compile(r"/api/transfers/[^/]+(/cancel)?")),
    ("DELETE", re.compile(r"/api/transfers/[^/]+")),
)

NO_API_KEY = "This gateway serves loopback only: set HOMEFLEET_API_KEY (or gateway.api_key) to admit other addresses."
WRONG_API_KEY = "Incorrect API key provided: send 'Authorization: Bearer <HOMEFLEET_API_KEY>'."
NO_ADMIN_KEY = ("Admin operations are served to loopback only: set HOMEFLEET_ADMIN_KEY (or gateway.admin_key) "
                "on the head to allow them from other addresses.")
WRONG_ADMIN_KEY = ("Incorrect admin key provided: send 'Authorization: Bearer <HOMEFLEET_ADMIN_KEY>' "
                   "(the admin key, not the API key).")
FOREIGN_HOST = ("Requests from this machine without a key must be addressed to localhost, 127.0.0.1 or [::1] "
                "(this one named {host!r}: a web page may be reaching the gateway through a browser); "
                "send the API key to use another name.")
FOREIGN_ORIGIN = ("Requests from a web page of another origin ({origin!r}) need the API key, even from this "
                  "machine; a browser app of your own can be allowed with gateway.cors_origins.")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_admin_operation(method: str, path: str) -> bool:
    return any(method.upper() == m and pattern.fullmatch(path) for m, pattern in ADMIN_OPERATIONS)


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header ('' for any other scheme)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _matches(sent: str, key: str) -> bool:
    return secrets.compare_digest(sent.encode(), key.encode())


class ApiKeyOffLoopback:
    def __init__(self, app, api_key: str | None, admin_key: str | None = None,
                 trusted_proxies: tuple[Network, ...] = (), local_names: frozenset[str] = frozenset(),
                 cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key
        self.trusted_proxies = trusted_proxies
        self.local_names = local_names
        self.cors_origins = tuple(cors_origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        peer = (scope.get("client") or (None,))[0]
        client = client_address(peer, headers.getlist("x-forwarded-for"), self.trusted_proxies)
        if client != peer:  # what the endpoints and logs see as the client, too
            scope = {**scope, "client": (client, 0)}
        if scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        sent = bearer_token(headers.get("authorization", ""))
        admin = is_admin_operation(scope.get("method", ""), scope["path"])
        if is_loopback(client):
            refusal = None if self._key_holds(sent, admin) else self._browser_refusal(headers)
        elif admin:
            refusal = self._admin_refusal(sent)
        else:
            refusal = self._api_refusal(sent)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        body = error_body(message, "invalid_request_error", None, code)
        await JSONResponse(status_code=status, content=body)(scope, receive, send)

    def _key_holds(self, sent: str, admin: bool) -> bool:
        key = self.admin_key if admin else self.api_key
        return bool(sent and key and _matches(sent, key))

    def _browser_refusal(self, headers: Headers) -> tuple[int, str, str] | None:
        """A keyless loopback request that a web page may have sent through a browser."""
        host = headers.get("host")
        if host is not None and not is_local_name(host_name(host), self.local_names):
            return 403, FOREIGN_HOST.format(host=host), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and not origin_is_local(origin, self.local_names, self.cors_origins):
            return 403, FOREIGN_ORIGIN.format(origin=origin), "origin_not_allowed"
        return None

    def _api_refusal(self, sent: str) -> tuple[int, str, str] | None:
        if not self.api_key:
            return 401, NO_API_KEY, "invalid_api_key"
        if not _matches(sent, self.api_key):
            return 401, WRONG_API_KEY, "invalid_api_key"
        return None

    def _admin_refusal(self, sent: str) -> tuple[int, str, str] | None:
        if not self.admin_key:
            return 403, NO_ADMIN_KEY, "admin_key_not_set"
        if not _matches(sent, self.admin_key):
            return 401, WRONG_ADMIN_KEY, "invalid_api_key"
        return None
