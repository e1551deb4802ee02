"""What every request body meets at the edge, before any field means anything.

- A field OpenAI does not define is a 400 `unknown_parameter` naming it (OpenAI's own answer:
  "Unrecognized request argument supplied"), at any depth.
- JSON null is the same as leaving an optional field out: every optional field is nullable.
- Text that is not text (a lone UTF-16 surrogate such as "\\ud800", which JSON can spell but
  UTF-8 cannot) is a 400 naming where it is, anywhere in the body, keys included: it would
  otherwise break the engine or the error answer itself.
- A field we do not honour is a 400 when set to anything but its neutral value, with
  OpenAI's codes: `unsupported_parameter` (the field) or `unsupported_value` (that value).

Errors raised here carry their OpenAI code as the pydantic error type and, where the field
is not the one being validated, its name in `ctx["param"]` (gateway/errors.py reads both).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, model_validator
from pydantic_core import PydanticCustomError

# What the OpenAPI document shows for a field that takes null only (anything else is a 400).
NULL_ONLY = {"type": "null"}
# Our own error types, read by the validation-error handler as OpenAI error codes.
ERROR_CODES = frozenset({"invalid_value", "unsupported_parameter", "unsupported_value"})
TAG_ERROR = "invalid_tag:"  # + the field: a tagged union's tag (`type`, `role`) names no member


def invalid(message: str, param: str | None = None) -> PydanticCustomError:
    return _error("invalid_value", message, param)


def unsupported(message: str, param: str | None = None) -> PydanticCustomError:
    """The field itself is not honoured here."""
    return _error("unsupported_parameter", message, param)


def unsupported_value(message: str, param: str | None = None) -> PydanticCustomError:
    """The field is honoured, but not with this value."""
    return _error("unsupported_value", message, param)


def _error(code: str, message: str, param: str | None) -> PydanticCustomError:
    # The message is a template for pydantic, and may quote a client's names: no braces in it.
    return PydanticCustomError(code, message.replace("{", "(").replace("}", ")"), {"param": param} if param else None)


class OpenAIObject(BaseModel):
    """A JSON object of OpenAI's API: unknown fields are errors, never silently dropped; values are
    taken as their JSON type says ("yes" is not a boolean, "7" not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIRequest(OpenAIObject):
    """A whole request body: its text is checked once, before the fields are read."""

    @model_validator(mode="before")
    @classmethod
    def _only_valid_text(cls, data: Any) -> Any:
        where = first_invalid_text(data)
        if where is not None:
            raise invalid(
                f"'{where or 'body'}' holds a lone UTF-16 surrogate (such as \\ud800), which is not valid text; "
                "send well-formed Unicode.",
                where or None,
            )
        return data


def first_invalid_text(value: Any) -> str | None:
    """Where the first string (or key) with a lone surrogate is, as a param path; None if nowhere."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return path
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                key_text = str(key)
                child_path = f"{path}.{key_text}" if path else key_text
                if not _is_text(key_text):
                    return _printable(child_path)
                children.append((child_path, child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(item)]))
    return None


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    return path.encode("utf-8", "replace").decode("utf-8")


def _tag_of(value: Any, key: str) -> str | None:
    tag = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return tag if isinstance(tag, str) else None


def tagged(*models: type[BaseModel], key: str = "type", note: str = "") -> Any:
    """A union chosen by the object's `key` field. Tags are the class names, so an error's location
    reads `...ImagePart...` and the error handler can tell a tag from a field name."""
    tags = {model.model_fields[key].annotation.__args__[0]: model.__name__ for model in models}
    members = tuple(Annotated[model, Tag(model.__name__)] for model in models)
    return Annotated[Union[members], Discriminator(  # noqa: UP007 (a runtime tuple of members)
        lambda value: tags.get(_tag_of(value, key)),
        custom_error_type=f"{TAG_ERROR}{key}",
        custom_error_message=f"'{key}' must be one of: " + ", ".join(repr(t) for t in tags) + note,
    )]
