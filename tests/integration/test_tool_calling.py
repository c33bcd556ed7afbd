"""Tool calling end to end (issue 10) with the openai package against the real default model: calls
forced by tool_choice always parse and match their function's schema, streamed or not; a
conversation with a tool's result goes on; a schema that does not compile is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline
from tests.integration.harness import torch_pipeline as start_torch_pipeline

openai = pytest.importorskip("openai")


class WeatherArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


def function(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER = function("get_weather", "The current weather in a city.", WeatherArguments.model_json_schema())
TIME = function("get_time", "The current time in a time zone.", {"type": "object", "properties": {}})
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    with start_torch_pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), "tools") as started:
        yield started


class Chat:
    """The openai client's chat.completions.create for the served model."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.client = openai.OpenAI(base_url=f"{pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def __call__(self, **fields: Any) -> Any:
        return self.client.chat.completions.create(model=self.model, **fields)


@pytest.fixture(scope="module")
def chat(pipeline: Pipeline) -> Chat:
    return Chat(pipeline)


def check_call(call: Any) -> None:
    """A call names an offered function, with arguments valid against its schema."""
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        WeatherArguments.model_validate_json(call.function.arguments)
    else:
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_required_calls_parse_and_match_their_schemas(chat: Chat) -> None:
    one_each = chat(
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        n=3,
        temperature=1.0,
    )
    for choice in one_each.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None, choice
        check_call(choice.message.tool_calls[0])
    # Parallel calls: the small model may go on calling until max_tokens, but every whole call counts.
    several = chat(messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=150, temperature=0)
    choice = several.choices[0]
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        check_call(call)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
def test_forced_calls_stream_as_tool_call_deltas(chat: Chat, tool_choice: Any) -> None:
    stream = chat(
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=120,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content  # nothing but the call
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    name, arguments = calls[0]["name"], calls[0]["arguments"]
    if tool_choice == NAMED or name == "get_weather":
        assert name == "get_weather"
        WeatherArguments.model_validate_json(arguments)
    else:
        assert name == "get_time" and json.loads(arguments) == {}


def test_a_named_function_is_the_one_called(chat: Chat) -> None:
    answer = chat(messages=ASK, tools=[TIME, WEATHER], tool_choice=NAMED, max_tokens=120, n=2, temperature=1.0)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
        WeatherArguments.model_validate_json(choice.message.tool_calls[0].function.arguments)


def test_a_conversation_goes_on_after_a_tool_result(chat: Chat) -> None:
    first = chat(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0)
    message = first.choices[0].message
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump() for call in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    answer = chat(messages=follow_up, tools=[WEATHER], max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The result is in the prompt the model read: it is longer than the conversation without it.
    shorter = chat(messages=follow_up[:2], tools=[WEATHER], max_tokens=1)
    assert answer.usage.prompt_tokens > shorter.usage.prompt_tokens + 10


def test_a_schema_that_does_not_compile_is_a_400_naming_tools(chat: Chat) -> None:
    broken = function("broken", "", {"type": "object", "properties": {"x": {"type": "no-such-type"}}})
    with pytest.raises(openai.BadRequestError) as refused:
        chat(messages=ASK, tools=[broken], tool_choice="required", max_tokens=5)
    assert refused.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as unknown:
        chat(
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=5,
        )
    assert unknown.value.body["param"] == "tool_choice.function.name"
