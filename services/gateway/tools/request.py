"""The tool-calling fields of a chat request (issue 10), as OpenAI defines them. Pure logic.

``tools`` lists functions (a name, a description, a JSON schema of the parameters);
``tool_choice`` says what the model may do with them: ``none`` (answer in text), ``auto`` (its
choice; the default when there are tools), ``required`` (call at least one) or
``{"type": "function", "function": {"name": ...}}`` (call that one). ``parallel_tool_calls``
false allows one call per answer. Assistant turns may carry ``tool_calls`` and ``tool`` turns
answer one by its ``tool_call_id`` (protocol.py's ChatMessageIn).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from services.gateway.errors import bad_request
from services.gateway.tools.calls import FunctionSpec, ToolChoiceMode, ToolUse, tools_json
from services.gateway.unknown_fields import TracksUnknownFields
from shared.messages import ToolCall

# OpenAI's rule for function names: what a template and a parser can carry unescaped.
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
TOOL_CHOICE_SCHEMA = {
    "anyOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            },
            "required": ["type", "function"],
        },
        {"type": "null"},
    ]
}


class FunctionIn(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; whether it compiles is the tokenizer's check
    strict: bool | None = None  # calls forced by tool_choice always follow the schema; free ones are parsed


class ToolIn(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionIn


class CalledFunctionIn(TracksUnknownFields):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str | dict[str, Any]  # JSON text, as OpenAI sends it; an object is taken too

    @field_validator("arguments")
    @classmethod
    def _check_arguments(cls, value: str | dict[str, Any]) -> str:
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("must be JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be JSON text of an object")
        return value


class ToolCallIn(TracksUnknownFields):
    """A call in an assistant turn of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunctionIn

    def to_wire(self) -> ToolCall:
        arguments = self.function.arguments  # text once validated; typed as sent
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return ToolCall(id=self.id, name=self.function.name, arguments=text)


def tool_use(tools: list[ToolIn] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolUse | None:
    """The request's tools and choice, checked (raises ApiError); None without tools."""
    if tool_choice is not None and not isinstance(tool_choice, (str, dict)):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or a named function.", "tool_choice")
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are given.", "tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise bad_request(f"Function names in tools must be unique; repeated: {', '.join(duplicates)}.", "tools")
    mode: ToolChoiceMode
    named = None
    if tool_choice is None or tool_choice == "auto":
        mode = "auto"
    elif tool_choice == "none":
        mode = "none"
    elif tool_choice == "required":
        mode = "required"
    elif isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request('A named tool_choice is {"type": "function", "function": {"name": ...}}.', "tool_choice")
        if name not in names:
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not in tools.", "tool_choice.function.name"
            )
        mode, named = "named", name
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or a named function.", "tool_choice")
    functions = tuple(FunctionSpec(tool.function.name, tool.function.parameters) for tool in tools)
    as_template_gets_them = [tool.model_dump(exclude_none=True) for tool in tools]
    return ToolUse(functions, tools_json(as_template_gets_them), mode, named, parallel_tool_calls is not False)
