"""The API key: asked of every address but loopback (the socket's peer, never a forwarded
header). A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide the client's
disconnect from the endpoints behind it."""

from __future__ import annotations

import ipaddress
import secrets

from fastapi.responses import JSONResponse

from orchestrator.gateway.errors import error_body

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header ('' for any other scheme)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class ApiKeyOffLoopback:
    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or is_loopback((scope.get("client") or (None,))[0]):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        sent = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if not self.api_key:
            message = ("This gateway serves loopback only: set HOMEFLEET_API_KEY (or gateway.api_key) "
                       "to admit other addresses.")
        elif not secrets.compare_digest(sent.encode(), self.api_key.encode()):
            message = "Incorrect API key provided: send 'Authorization: Bearer <HOMEFLEET_API_KEY>'."
        else:
            return await self.app(scope, receive, send)
        body = error_body(message, "invalid_request_error", None, "invalid_api_key")
        await JSONResponse(status_code=401, content=body)(scope, receive, send)
