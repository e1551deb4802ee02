"""The shape of the answer a chat request asks for: `response_format`, `tools`, `tool_choice`.

The engine enforces them (grammars, tool-call parsing); here they are checked and turned into
the plain values the engine reads from `sampling`:
    "response_format": None | {"type": "text"} | {"type": "json_object"}
                       | {"type": "json_schema", "json_schema": {"name", "schema": dict, "strict": bool | None
                                                               [, "description"]}}
    "tools": None | [{"type": "function", "function": {"name"[, "description", "parameters", "strict"]}}]
    "tool_choice": None | "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.gateway.request_model import OpenAIObject, invalid, tagged

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class TextFormat(OpenAIObject):
    type: Literal["text"]

    def engine_form(self) -> dict[str, Any]:
        return {"type": "text"}


class JsonObjectFormat(OpenAIObject):
    type: Literal["json_object"]

    def engine_form(self) -> dict[str, Any]:
        return {"type": "json_object"}


class JsonSchemaSpec(OpenAIObject):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str | None = Field(None, description="Guidance for the model about what the object is for.")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON Schema the answer must match (absent: any JSON object)."
    )
    strict: bool | None = None


class JsonSchemaFormat(OpenAIObject):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec

    def engine_form(self) -> dict[str, Any]:
        spec = self.json_schema
        schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
        out: dict[str, Any] = {"name": spec.name, "schema": schema, "strict": spec.strict}
        if spec.description is not None:
            out["description"] = spec.description
        return {"type": "json_schema", "json_schema": out}


ResponseFormat = tagged(TextFormat, JsonObjectFormat, JsonSchemaFormat)


class FunctionDefinition(OpenAIObject):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = None


class Tool(OpenAIObject):
    type: Literal["function"] = Field(..., description="Only function tools (custom tools are a 400).")
    function: FunctionDefinition

    def engine_form(self) -> dict[str, Any]:
        function = self.function.model_dump(exclude_none=True)
        return {"type": "function", "function": function}


class FunctionName(OpenAIObject):
    name: str = Field(..., min_length=1)


class NamedToolChoice(OpenAIObject):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[Tool] | None, tool_choice: Any) -> None:
    names = [tool.function.name for tool in tools or []]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise invalid(f"two tools are named '{name}'", f"tools[{index}].function.name")
    if tool_choice is None:
        return
    if not names:
        raise invalid("tool_choice is only allowed when tools are specified", "tool_choice")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise invalid(f"tool_choice names function '{tool_choice.function.name}', which is not in tools "
                      f"({', '.join(names)})", "tool_choice")


def tool_choice_engine_form(tool_choice: Any) -> Any:
    if isinstance(tool_choice, NamedToolChoice):
        return {"type": "function", "function": {"name": tool_choice.function.name}}
    return tool_choice
