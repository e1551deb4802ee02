"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.errors import RequestError


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


log = logging.getLogger(__name__)
RETRY_AFTER_S = "2"


def error_response(exc: RequestError) -> JSONResponse:
    # 503 means busy, loading or not placed yet: tell clients when to try again.
    retry_after = str(exc.retry_after_s) if exc.retry_after_s else RETRY_AFTER_S
    headers = {"Retry-After": retry_after} if exc.status == 503 else None
    return JSONResponse(
        status_code=exc.status,
        content=error_body(exc.message, exc.type, exc.param, exc.code),
        headers=headers,
    )


def _param_of(loc: tuple) -> str | None:
    # pydantic names the union branch it tried ("str", "list[ContentPart]"): not a field.
    parts = [str(p) for p in loc if p != "body" and not _is_type_tag(p)]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(first.get("ctx", {}).get("error", "invalid JSON"))
        return JSONResponse(status_code=400, content=error_body(message, "invalid_request_error", None, "invalid_json"))
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        message = "The request needs a JSON body."
        code = "missing_required_parameter"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    elif first.get("type") == "model_attributes_type" and param is None:
        message = "The request body must be a JSON object."
        code = "invalid_type"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        code = "invalid_value"
    return JSONResponse(status_code=400, content=error_body(message, "invalid_request_error", param, code))


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"Unknown URL: {request.method} {request.url.path}"
    return JSONResponse(status_code=exc.status_code, content=error_body(message, type_), headers=getattr(exc, "headers", None))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(
        status_code=500,
        content=error_body(f"The server had an error ({type(exc).__name__}); it is logged.", "server_error"),
    )


def install_error_handlers(app) -> None:
    app.add_exception_handler(Exception, _on_unexpected_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
