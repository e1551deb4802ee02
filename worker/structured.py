"""Output constrained by a llama.cpp grammar: `response_format` (json_object, json_schema)
and forced tool calls. The JSON Schema to GBNF conversion is llama.cpp's own (its Python
port ships with llama-cpp-python); a schema it cannot convert is a clear 400."""

from __future__ import annotations

import json

from worker.errors import RequestError


def json_grammar(response_format: dict | None):
    """The grammar for a response_format, or None for plain text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    from llama_cpp.llama_grammar import JSON_GBNF

    kind = response_format["type"]
    if kind == "json_object":
        return _grammar(JSON_GBNF, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format.json_schema.schema", code="invalid_json_schema")
        return schema_grammar(schema, "response_format.json_schema.schema")
    raise RequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       param="response_format.type", code="unsupported_value")


def schema_grammar(schema: dict, param: str):
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter asserts on what it cannot express
        raise RequestError(f"this JSON Schema cannot be enforced: {exc or type(exc).__name__}", param=param,
                           code="invalid_json_schema") from None
    return _grammar(gbnf, param)


def _grammar(gbnf: str, param: str):
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as exc:
        raise RequestError(f"the grammar for {param} does not parse: {exc}", param=param,
                           code="invalid_json_schema") from None
