"""Tools and tool turns in a chat prompt (issue 10). Pure logic.

A chat template that knows tools (its source mentions ``tools``: Qwen 2.5/3, Hermes, Llama 3.1,
SmolLM3...) gets them as transformers passes them: the ``tools`` list, assistant turns with
``tool_calls`` (arguments as objects, which those templates expect) and ``tool`` turns with their
``tool_call_id``. A template without tool support (the default model's) would drop all of it
without a word, and the model would never hear of the functions; for such a template the
conversation is rewritten in the Hermes form the gateway's default parser reads: the functions
in the system turn, each call as a ``<tool_call>`` line in its assistant turn, the results as
``<tool_response>`` blocks in a user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.tokenizer.errors import InvalidRequest
from shared.messages import ChatMessage

_TOOLS_INTRO = (
    "You can call functions to answer the user. Their signatures are between <tools> and </tools>:\n<tools>\n"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nTo call a function, answer with one JSON object per call, each between <tool_call> and "
    '</tool_call> on lines of their own:\n<tool_call>\n{"name": <function name>, "arguments": <arguments as a '
    "JSON object>}\n</tool_call>"
)


def template_knows_tools(template: Any) -> bool:
    """Whether a chat template (its source, or a dict of named sources) reads a ``tools`` variable."""
    if isinstance(template, dict):
        return any(template_knows_tools(source) for source in template.values())
    return isinstance(template, str) and "tools" in template


def parse_tools(tools: str | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    try:
        parsed = json.loads(tools)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(tool, dict) for tool in parsed):
        raise InvalidRequest("tools must be a list of tool objects.", "tools")
    return parsed


def _arguments(message: ChatMessage, index: int) -> list[dict[str, Any]]:
    calls = []
    for number, call in enumerate(message.tool_calls or []):
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            param = f"messages[{index}].tool_calls[{number}].function.arguments"
            raise InvalidRequest("Tool call arguments must be JSON text of an object.", param)
        calls.append({"id": call.id, "name": call.name, "arguments": arguments})
    return calls


def native_conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as transformers gives it to a template that knows tools."""
    conversation = []
    for index, message in enumerate(messages):
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in _arguments(message, index)
            ]
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            turn["name"] = message.name
        conversation.append(turn)
    return conversation


def hermes_conversation(messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation in Hermes form, for a template that knows only roles and text."""
    conversation: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if message.role == "tool":
            response = f"<tool_response>\n{message.content}\n</tool_response>"
            previous = conversation[-1] if conversation else None
            if previous is not None and previous.get("tool_responses"):
                previous["content"] += "\n" + response  # one user turn answers all the calls of a turn
            else:
                conversation.append({"role": "user", "content": response, "tool_responses": True})
            continue
        content = message.content
        if message.tool_calls:
            calls = [
                "<tool_call>\n"
                + json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
                + "\n</tool_call>"
                for call in _arguments(message, index)
            ]
            content = "\n".join([content, *calls] if content else calls)
        conversation.append({"role": message.role, "content": content})
    for turn in conversation:
        turn.pop("tool_responses", None)
    if tools:
        listing = _TOOLS_INTRO + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_OUTRO
        if conversation and conversation[0]["role"] == "system":
            conversation[0]["content"] = f"{conversation[0]['content']}\n\n{listing}"
        else:
            conversation.insert(0, {"role": "system", "content": listing})
    return conversation
