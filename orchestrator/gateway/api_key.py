"""The keys: the API key is asked of every address but loopback, the admin key of admin
operations from every address but loopback (the socket's peer, never a forwarded header).
A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide the client's disconnect
from the endpoints behind it.

On an admin path the admin key stands in for the API key: off loopback it is the one key
checked there (one `Authorization` header carries one key), and the API key alone does not
open it. Without an admin key configured, admin operations are refused off loopback (403).
"""

from __future__ import annotations

import ipaddress
import re
import secrets

from fastapi.responses import JSONResponse

from orchestrator.gateway.errors import error_body

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
# Operations that change what the fleet serves or stores: (method, path pattern).
ADMIN_OPERATIONS = (
    ("POST", re.compile(r"/api/models/[^/]+/(load|unload)")),
    ("POST", re.compile(r"/api/reload")),
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
    def __init__(self, app, api_key: str | None, admin_key: str | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or is_loopback((scope.get("client") or (None,))[0]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        sent = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if is_admin_operation(scope.get("method", ""), scope["path"]):
            refusal = self._admin_refusal(sent)
        else:
            refusal = self._api_refusal(sent)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        body = error_body(message, "invalid_request_error", None, code)
        await JSONResponse(status_code=status, content=body)(scope, receive, send)

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
