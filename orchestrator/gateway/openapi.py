"""The OpenAPI document, true to what the server does.

- Errors are 400 (never FastAPI's 422) and the other statuses each operation can answer,
  all with OpenAI's error body; 401 off loopback on every operation but the public ones,
  403 on admin operations (off loopback without an admin key set);
  400 and 413 wherever a body is read.
- `stream: true` answers are documented as `text/event-stream` beside the JSON answer.
- The request body is JSON, whatever Content-Type it is sent with (gateway/request_body.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from orchestrator.gateway.api_key import PUBLIC_PATHS, is_admin_operation
from orchestrator.gateway.responses import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
DESCRIPTIONS = {
    400: "Invalid request: a field that is missing, unknown, invalid or not supported here (named in `param`), "
    "or JSON that does not parse.",
    401: "Off loopback without the API key (`Authorization: Bearer <key>`; the admin key for admin operations).",
    403: "An admin operation off loopback while the head has no admin key (gateway.admin_key, HOMEFLEET_ADMIN_KEY).",
    404: "No such model (or object).",
    409: "Conflict with what is there already.",
    413: "The body is larger than gateway.max_body_bytes.",
    502: "The replica failed under the request (it is replaced if it died); retry.",
    503: "The model is not ready (loading, copying, pending, failed) or its replicas are busy; see Retry-After.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}
BODY_NOTE = "JSON, whatever the Content-Type header says (text/plain and form types are read as JSON too)."


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": DESCRIPTIONS[status]}
        if status == 503:
            out[status]["headers"] = RETRY_AFTER
    return out


def answer_or_events(model: type, events: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events when the request says stream: true (each event
    described the OpenAPI 3.2 way, by `itemSchema`)."""
    return {
        200: {
            "model": model,
            "description": f"The answer as JSON; with `stream: true`, server-sent events: {events}",
            "content": {"text/event-stream": {"itemSchema": sse_event(events)}},
        }
    }


def sse_event(data: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "description": data},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
    }


def install_openapi(app: FastAPI) -> None:
    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _make_true(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document


def _make_true(schema: dict[str, Any]) -> None:
    _add_error_schema(schema.setdefault("components", {}).setdefault("schemas", {}))
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if "requestBody" in operation:
                operation["requestBody"]["description"] = BODY_NOTE
                for status in (400, 413):
                    responses.setdefault(str(status), _error(status))
            if path not in PUBLIC_PATHS:
                responses.setdefault("401", _error(401))
            if is_admin_operation(method, path):
                responses.setdefault("403", _error(403))
    _drop_unreferenced(schema)


def _error(status: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS[status], "content": {"application/json": {"schema": ERROR_REF}}}


def _add_error_schema(components: dict[str, Any]) -> None:
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in error.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorResponse", error)


def _drop_unreferenced(schema: dict[str, Any]) -> None:
    """Leave out schemas nothing refers to (FastAPI's 422 bodies, the refused content parts)."""
    components = schema["components"]["schemas"]
    while True:
        text = json.dumps({"paths": schema["paths"], "components": components})
        unused = [name for name in components if f'"#/components/schemas/{name}"' not in text]
        if not unused:
            return
        for name in unused:
            del components[name]
