"""Tool calling's plain types (issue 10): the functions a request offers, what it lets the model do
with them, and the calls a parser finds in the output. Pure logic.

A ``ToolFormat`` is one template family's way of writing calls (hermes.py): a parser for the
output and a grammar that forces calls in that same form. ``FORMATS`` lists the known ones, by
the name ``SCALELLM_TOOL_CALL_PARSER`` takes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.messages import StructuredOutputs

ToolChoiceMode = Literal["none", "auto", "required", "named"]
# A function offered without parameters takes none, as OpenAI reads it.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    parameters: dict[str, Any] | None = None  # a JSON schema

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else _NO_PARAMETERS

    def forced_arguments_schema(self, root: str = "#") -> dict[str, Any]:
        """The schema a forced call's arguments follow, to be placed at JSON pointer ``root`` of the grammar's
        schema: ``parameters_schema`` with its local ``$ref``s rebased there (pydantic writes nested models as
        ``#/$defs/...``, which points at the whole schema's root, not the arguments'), and every object that
        does not say otherwise closed to the properties it lists (as xgrammar's strict mode, vLLM's default,
        reads schemas: JSON Schema lets an object without ``additionalProperties`` take any key, so a small
        model forced to call ``get_time`` ({"properties": {}}) could invent arguments until max_tokens)."""
        forced: dict[str, Any] = _forced_schema(self.parameters_schema(), root)
        return forced


# Keywords that decide an object's other keys themselves: a schema with any of them is left as written.
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
# Keywords whose value maps names to schemas (walked value by value), and those whose value is data.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYWORDS = ("const", "enum", "default", "examples")


def _forced_schema(schema: Any, root: str) -> Any:
    """A copy of ``schema`` with ``additionalProperties: false`` on each object schema (one with
    ``"type": "object"`` or ``properties``) that has none of _OPEN_KEYWORDS, and each local ``$ref``
    ("#" or "#/...") rebased onto ``root``, at every depth ($defs, anyOf, items, ... included)."""
    if isinstance(schema, list):
        return [_forced_schema(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    forced: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            forced[key] = value
        elif key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            forced[key] = root + value[1:]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            forced[key] = {name: _forced_schema(sub, root) for name, sub in value.items()}
        else:
            forced[key] = _forced_schema(value, root)
    is_object = schema.get("type") == "object" or isinstance(schema.get("properties"), dict)
    if is_object and not any(key in schema for key in _OPEN_KEYWORDS):
        forced["additionalProperties"] = False
    return forced


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI returns it


@dataclass(slots=True)
class ParserOutput:
    """What a piece of output holds: text for the message's content, and calls made whole."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser(Protocol):
    def feed(self, text: str) -> ParserOutput: ...

    def finish(self) -> ParserOutput: ...


class ToolFormat(Protocol):
    name: str

    def parser(self) -> ToolCallParser: ...

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool) -> str: ...


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A chat request's tools and what ``tool_choice`` lets the model do with them."""

    functions: tuple[FunctionSpec, ...]
    tools_json: str  # the request's ``tools`` as the chat template gets them
    mode: ToolChoiceMode
    named: str | None = None  # the function ``tool_choice`` names
    parallel: bool = True  # ``parallel_tool_calls``

    @property
    def parses_output(self) -> bool:
        """Whether calls are looked for in the output (not with ``tool_choice`` "none")."""
        return self.mode != "none"

    def constraint(self, tool_format: ToolFormat) -> StructuredOutputs | None:
        """The grammar that forces a call for ``required`` and a named function; None otherwise."""
        if self.mode == "required":
            functions: Sequence[FunctionSpec] = self.functions
        elif self.mode == "named":
            functions = [f for f in self.functions if f.name == self.named]
        else:
            return None
        grammar = tool_format.grammar(functions, parallel=self.parallel and self.mode == "required")
        # A 400 for a schema that does not compile names "tools": the schemas are the client's.
        return StructuredOutputs(grammar=grammar, param="tools")


def tools_json(tools: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(tools), ensure_ascii=False)
