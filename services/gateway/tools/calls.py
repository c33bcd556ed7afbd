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
