"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

A request that fails validation is a 400 (never FastAPI's 422) naming the parameter, with
OpenAI's codes: `missing_required_parameter`, `unknown_parameter`, `invalid_value`,
`unsupported_parameter`, `unsupported_value`, `invalid_json`.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.gateway.request_model import ERROR_CODES, TAG_ERROR
from worker.errors import RequestError

log = logging.getLogger(__name__)
RETRY_AFTER_S = "2"
# pydantic's names for the branch of a union it tried: not fields.
BASIC_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _text(value: str | None) -> str | None:
    """Error text can quote what a client sent: keep it encodable (lone surrogates become '?')."""
    return None if value is None else value.encode("utf-8", "replace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _text(message), "type": type_, "param": _text(param), "code": code}}


def error_response(exc: RequestError) -> JSONResponse:
    # 503 means busy, loading or not placed yet: tell clients when to try again.
    retry_after = str(exc.retry_after_s) if exc.retry_after_s else RETRY_AFTER_S
    headers = {"Retry-After": retry_after} if exc.status == 503 else None
    return JSONResponse(
        status_code=exc.status,
        content=error_body(exc.message, exc.type, exc.param, exc.code),
        headers=headers,
    )


def param_of(loc: tuple) -> str | None:
    """`messages[0].content[1].text` from pydantic's location, without its union tags."""
    out = ""
    for part in loc:
        if part == "body" or (part == "query" and not out) or _is_type_tag(part):  # a query parameter: its name
            continue
        part = str(part)
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def _is_type_tag(part) -> bool:
    # "str", "list[str]", "literal['auto','none']", or a class name (our unions are tagged by class).
    return isinstance(part, str) and (part in BASIC_TYPE_TAGS or "[" in part or part[:1].isupper())


def _most_specific(errors: list[dict]) -> dict:
    """Of the errors of a union's branches, the one that got deepest into the value says most."""
    return max(errors, key=lambda e: len([p for p in e.get("loc", ()) if not _is_type_tag(p)]))


def validation_error_body(errors: list[dict]) -> dict:
    if not errors:
        return error_body("The request is invalid.", "invalid_request_error", None, "invalid_value")
    first = _most_specific(errors)
    kind = first.get("type", "")
    ctx = first.get("ctx") or {}
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(ctx.get("error", "invalid JSON"))
        return error_body(message, "invalid_request_error", None, "invalid_json")
    param = ctx.get("param") or param_of(tuple(first.get("loc", ())))
    if kind.startswith(TAG_ERROR):
        key = kind.removeprefix(TAG_ERROR)
        param = f"{param}.{key}" if param else key
        message, code = first.get("msg", "invalid"), "invalid_value"
    elif kind in ERROR_CODES:
        message, code = first.get("msg", "invalid"), kind
    elif kind == "missing" and param is None:
        message, code = "The request needs a JSON body.", "missing_required_parameter"
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif kind == "extra_forbidden":
        message, code = f"Unrecognized request argument supplied: '{param}'.", "unknown_parameter"
    elif kind == "model_attributes_type" and param is None:
        message, code = "The request body must be a JSON object.", "invalid_type"
    else:
        message, code = f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", "invalid_value"
    return error_body(message, "invalid_request_error", param, code)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=400, content=validation_error_body(list(exc.errors())))


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"Unknown URL: {request.method} {request.url.path}"
    headers = getattr(exc, "headers", None)
    return JSONResponse(status_code=exc.status_code, content=error_body(message, type_), headers=headers)


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
