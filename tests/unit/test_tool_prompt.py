"""Tools and tool turns in the prompt (issue 10): what the model reads of them, for a chat template
with tool support and for one without (the default model's)."""

from __future__ import annotations

import json
import time
from typing import Any

from services.gateway.tools.hermes import HermesParser
from services.tokenizer.prompt import PromptProcessor
from shared.messages import ChatMessage, CompletionRequest, RequestFailed, TokenizedRequest, ToolCall

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION = [
    ChatMessage(role="user", content="Weather in Paris and Rome?"),
    ChatMessage(
        role="assistant",
        content="",
        tool_calls=[
            ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
            ToolCall(id="call_2", name="get_weather", arguments='{"city": "Rome"}'),
        ],
    ),
    ChatMessage(role="tool", content="21 C, sunny", tool_call_id="call_1"),
    ChatMessage(role="tool", content="25 C, clear", tool_call_id="call_2"),
]


def chat(processor: PromptProcessor, messages: list[ChatMessage], **fields: Any) -> TokenizedRequest | RequestFailed:
    request = CompletionRequest(
        request_id="chatcmpl-1", gateway_id="gw", deadline=time.time() + 60, messages=messages, **fields
    )
    return processor.process(request)


def prompt_text(processor: PromptProcessor, tokenizer: Any, messages: list[ChatMessage], **fields: Any) -> str:
    out = chat(processor, messages, **fields)
    assert isinstance(out, TokenizedRequest), out
    return str(tokenizer.decode(out.prompt_token_ids))


def test_a_template_without_tools_gets_them_written_out_in_hermes_form(tokenizer: Any) -> None:
    processor = PromptProcessor(tokenizer, max_model_len=2048, eos_token_ids=[2])
    text = prompt_text(processor, tokenizer, CONVERSATION, tools=json.dumps(TOOLS))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n") and "<tools>" in system
    assert json.dumps(TOOLS[0]) in system  # the function, its description and parameters
    # The assistant's calls are in its turn as the parser reads them back.
    assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parser = HermesParser()
    calls = parser.feed(assistant).calls + parser.finish().calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    # Both results answer in one user turn, after the calls.
    assert (
        "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response>\n"
        "<tool_response>\n25 C, clear\n</tool_response><|im_end|>" in text
    )
    assert text.endswith("<|im_start|>assistant\n")
    # Without tools the prompt is what it always was.
    plain = [ChatMessage(role="user", content="Hi")]
    assert "<tools>" not in prompt_text(processor, tokenizer, plain)


class ToolAwareTemplate:
    """A tokenizer whose chat template reads ``tools``: records what it is given."""

    chat_template = "{% for tool in tools %}{{ tool.function.name }}{% endfor %}"

    def __init__(self) -> None:
        self.conversation: list[dict[str, Any]] = []
        self.kwargs: dict[str, Any] = {}

    def __len__(self) -> int:
        return 10

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [3] * len(text)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        self.conversation, self.kwargs = conversation, kwargs
        return "chat"


def test_a_template_with_tools_gets_them_as_transformers_passes_them() -> None:
    template = ToolAwareTemplate()
    processor = PromptProcessor(template, max_model_len=64, eos_token_ids=[1])  # type: ignore[arg-type]
    assert isinstance(chat(processor, CONVERSATION, tools=json.dumps(TOOLS)), TokenizedRequest)
    assert template.kwargs["tools"] == TOOLS
    calls = template.conversation[1]["tool_calls"]
    assert calls[0] == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert template.conversation[2] == {"role": "tool", "content": "21 C, sunny", "tool_call_id": "call_1"}


def test_arguments_that_are_not_an_object_are_a_400_naming_them(tokenizer: Any) -> None:
    processor = PromptProcessor(tokenizer, max_model_len=2048, eos_token_ids=[2])
    bad = ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c", name="f", arguments="[1]")])
    out = chat(processor, [ChatMessage(role="user", content="Hi"), bad])
    assert isinstance(out, RequestFailed) and out.status == 400
    assert out.param == "messages[1].tool_calls[0].function.arguments"
    not_tools = chat(processor, [ChatMessage(role="user", content="Hi")], tools='{"a": 1}')
    assert isinstance(not_tools, RequestFailed) and not_tools.param == "tools"
