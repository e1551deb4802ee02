"""What the gateway takes as a request body: at most `gateway.max_body_bytes`, read as JSON
whatever its Content-Type.

- A body over the limit is a 413 before anything parses it: at once when Content-Length says
  so, else as soon as the chunks received pass the limit (a chunked body has no length).
- JSON sent as text/plain, or as a form type (curl -d without -H), is read as JSON: the
  endpoints take nothing else, and the alternative (a 415) helps nobody.
A plain ASGI middleware, so endpoints still see the client's disconnect.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from orchestrator.gateway.errors import error_body

JSON_TYPE = b"application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def too_large(limit_bytes: int, got_bytes: int | None) -> JSONResponse:
    size = f"is {got_bytes} bytes" if got_bytes is not None else f"passed {limit_bytes} bytes"
    return JSONResponse(
        status_code=413,
        content=error_body(
            f"The request body {size}; this gateway takes at most {limit_bytes} bytes (gateway.max_body_bytes).",
            "invalid_request_error", None, "request_too_large",
        ),
        headers={"Connection": "close"},
    )


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == JSON_TYPE or media.endswith(b"+json")


class RequestBody:
    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body_bytes:
            return await too_large(self.max_body_bytes, declared)(scope, receive, send)
        if not declared and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_large(self.max_body_bytes, None)(scope, receive, send)
        if scope.get("method") in BODY_METHODS and not _is_json(headers.get(b"content-type", b"")):
            scope = {**scope, "headers": _as_json(scope["headers"])}
        await self.app(scope, _replay(bytes(body), receive), send)


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    try:
        return int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != b"content-type"] + [(b"content-type", JSON_TYPE)]


def _replay(body: bytes, receive):
    """The body as one message, then the connection's own messages (its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
