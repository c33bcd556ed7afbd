"""A chat choice's output with its tool calls taken out, as OpenAI returns them. Pure logic.

Streamed, each call goes out whole in one ``tool_calls`` delta (its ``index``, ``id``, name and
arguments) once the parser has all of it; the content around calls streams as it comes. A
choice that made calls ends with ``finish_reason`` "tool_calls".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from services.gateway.tools.calls import ParsedCall, ParserOutput, ToolCallParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallOutput:
    """One choice's parser, and the ids and indexes of the calls it has found."""

    def __init__(self, parser: ToolCallParser, call_id: Callable[[], str] = new_call_id) -> None:
        self._parser = parser
        self._call_id = call_id
        self.calls_made = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The content and the streamed ``tool_calls`` entries (with ``index``) in the next text."""
        return self._entries(self._parser.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict[str, Any]], str | None]:
        """What the end of the output releases, and the choice's finish reason."""
        content, calls = self._entries(self._parser.finish())
        if self.calls_made and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, calls, finish_reason

    def whole(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """A whole output (non-streaming): its content (None when only calls), its calls, its finish reason."""
        content, calls = self.feed(text)
        rest, more, finish_reason = self.finish(finish_reason)
        content += rest
        for call in (*calls, *more):
            call.pop("index")
        return (content or None) if calls or more else content, [*calls, *more], finish_reason

    def _entries(self, found: ParserOutput) -> tuple[str, list[dict[str, Any]]]:
        # Whitespace between and after calls is layout, not something the model said.
        content = found.content if not (self.calls_made or found.calls) or found.content.strip() else ""
        return content, [self._entry(call) for call in found.calls]

    def _entry(self, call: ParsedCall) -> dict[str, Any]:
        index = self.calls_made
        self.calls_made += 1
        return {
            "index": index,
            "id": self._call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
