"""Hermes-style tool calls (Hermes 2 Pro, Qwen 2.5 and 3, SmolLM3 and the templates after them):
each call is a JSON object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and
``</tool_call>`` lines, any text before them being the message's content. Pure logic.

``HermesParser`` reads a choice's output as it streams: text that cannot start a call goes out
as content at once, a call goes out whole once its closing tag arrives (a suffix that may begin
an opening tag waits for the next text). ``HermesFormat.grammar`` is the Lark grammar
(llguidance's dialect) that forces well-formed calls, for ``tool_choice`` ``required`` or a named
function: the same text the parser reads, so forced and free calls take one path out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.gateway.tools.calls import FunctionSpec, ParsedCall, ParserOutput

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def parse_call(body: str) -> ParsedCall | None:
    """One call's JSON, or None when it is not ``{"name": str, "arguments": object}``."""
    try:
        value: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    # Some fine-tunes write "parameters" for "arguments".
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class HermesParser:
    """One choice's output, fed as it arrives; content and whole calls come out in order."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet given out
        self._in_call = False  # past an opening tag, waiting for its closing one

    def feed(self, text: str) -> ParserOutput:
        self._pending += text
        out = ParserOutput()
        while True:
            if not self._in_call:
                start = self._pending.find(OPEN)
                if start < 0:
                    keep = _held_back(self._pending, OPEN)
                    out.content += self._pending[: len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep :]
                    return out
                out.content += self._pending[:start]
                self._pending = self._pending[start + len(OPEN) :]
                self._in_call = True
            end = self._pending.find(CLOSE)
            if end < 0:
                return out
            body, self._pending = self._pending[:end], self._pending[end + len(CLOSE) :]
            self._in_call = False
            call = parse_call(body)
            if call is None:  # not a call after all: the model's text, as it wrote it
                out.content += OPEN + body + CLOSE
            else:
                out.calls.append(call)

    def finish(self) -> ParserOutput:
        """The end of the output: a call whose closing tag never came still counts if its JSON is whole."""
        rest, self._pending = self._pending, ""
        if not self._in_call:
            return ParserOutput(content=rest)
        self._in_call = False
        call = parse_call(rest)
        return ParserOutput(calls=[call]) if call is not None else ParserOutput(content=OPEN + rest)


class HermesFormat:
    """Tool calls as Hermes writes them: the parser and the grammar that forces them."""

    name = "hermes"

    @staticmethod
    def parser() -> HermesParser:
        return HermesParser()

    @staticmethod
    def grammar(functions: Sequence[FunctionSpec], *, parallel: bool) -> str:
        """One call to one of ``functions`` (or several calls, with ``parallel``), arguments per schema."""
        # Each function's arguments schema sits in the root's $defs, its own $refs rebased there: a ref
        # is resolved against the whole schema's root, which the call object wraps.
        defs = {f"arguments_{i}": f.forced_arguments_schema(f"#/$defs/arguments_{i}") for i, f in enumerate(functions)}
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": {"$ref": f"#/$defs/arguments_{i}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, f in enumerate(functions)
        ]
        schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
        # Compact JSON: a small model otherwise pads with whitespace the grammar allows.
        schema = {"x-guidance": {"whitespace_flexible": False}, **schema, "$defs": defs}
        calls = 'call ("\\n" call)*' if parallel else "call"
        return (
            f"start: {calls}\n"
            f'call: "{OPEN}\\n" call_json "\\n{CLOSE}"\n'
            f"call_json: %json {json.dumps(schema, ensure_ascii=False)}\n"
        )
