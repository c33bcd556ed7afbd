"""Tool calling in the gateway (issue 10): the Hermes parser, the calls OpenAI clients get, and
the grammar that forces a call. Pure logic, but for llguidance and the default model's tokenizer."""

from __future__ import annotations

import json
from itertools import count
from typing import Any

import llguidance
import pytest

from services.gateway.responses import ResponseBuilder
from services.gateway.tools.calls import FunctionSpec, ParserOutput, ToolUse
from services.gateway.tools.hermes import HermesFormat, HermesParser
from services.gateway.tools.output import ToolCallOutput
from shared.messages import StructuredOutputs, TextDelta
from shared.structured import grammar_text, llg_tokenizer, new_matcher

WEATHER = FunctionSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
    },
)
TIME = FunctionSpec("get_time", None)
OUTPUT = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def run(parser: HermesParser, pieces: list[str]) -> ParserOutput:
    total = ParserOutput()
    for piece in [*pieces, None]:
        out = parser.feed(piece) if piece is not None else parser.finish()
        total.content += out.content
        total.calls += out.calls
    return total


def test_calls_are_found_however_the_output_is_cut() -> None:
    whole = run(HermesParser(), [OUTPUT])
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}),
        ("get_time", {}),
    ]
    assert whole.content.strip() == "Let me check."
    for cut in range(1, len(OUTPUT)):
        assert run(HermesParser(), [OUTPUT[:cut], OUTPUT[cut:]]) == whole, cut
    assert run(HermesParser(), list(OUTPUT)) == whole


def test_text_streams_at_once_but_a_possible_tag_waits() -> None:
    parser = HermesParser()
    assert parser.feed("Hello <tool").content == "Hello "  # "<tool" may open a call
    assert parser.feed("box> done").content == "<toolbox> done"  # it did not


def test_what_is_not_a_call_stays_the_models_text() -> None:
    bad = "<tool_call>\nnot json\n</tool_call> after"
    assert run(HermesParser(), [bad]) == ParserOutput(content=bad)
    unclosed = '<tool_call>\n{"name": "get_time"'
    assert run(HermesParser(), [unclosed]) == ParserOutput(content=unclosed)


def test_a_call_cut_off_before_its_closing_tag_still_counts_when_its_json_is_whole() -> None:
    out = run(HermesParser(), ['<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'])
    assert [(c.name, c.arguments) for c in out.calls] == [("get_time", '{"tz": "UTC"}')]


def ids() -> Any:
    numbers = count()
    return lambda: f"call_{next(numbers)}"


def test_a_choice_with_calls_ends_with_tool_calls_and_numbers_them() -> None:
    content, calls, finish = ToolCallOutput(HermesParser(), ids()).whole(OUTPUT, "stop")
    assert content is not None and content.strip() == "Let me check."
    assert finish == "tool_calls"
    assert calls[1] == {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    # Text without calls is the content, unchanged, and the finish reason stays.
    assert ToolCallOutput(HermesParser()).whole("Sunny.", "stop") == ("Sunny.", [], "stop")
    # Cut by max_tokens inside a call: no call, the text as it came.
    assert ToolCallOutput(HermesParser()).whole("<tool_call>\n{", "length") == ("<tool_call>\n{", [], "length")


def test_streamed_chunks_carry_each_call_whole_with_its_index() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, tool_calls=ToolCallOutput(HermesParser(), ids()))
    chunks = []
    for start in range(0, len(OUTPUT), 7):
        last = start + 7 >= len(OUTPUT)
        delta = TextDelta(request_id="r", text=OUTPUT[start : start + 7], finish_reason="stop" if last else None)
        chunk = builder.text_chunk(delta.text, delta)
        if chunk is not None:
            chunks.append(json.loads(chunk[6:]))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["id"], c["function"]["name"]) for c in calls] == [
        (0, "call_0", "get_weather"),
        (1, "call_1", "get_time"),
    ]
    assert "".join(d.get("content", "") for d in deltas).strip() == "Let me check."
    assert not any("<tool" in d.get("content", "") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_whole_response_has_the_calls_in_its_message() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, tool_calls=ToolCallOutput(HermesParser(), ids()))
    output = builder.collector()
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    output.add(TextDelta(request_id="r", text=call, token_ids=[1], finish_reason="stop"))
    choice = builder.full_response(output)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
    }


@pytest.fixture(scope="module")
def llg(tokenizer: Any) -> llguidance.LLTokenizer:
    return llg_tokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def accepts(llg: llguidance.LLTokenizer, tokenizer: Any, constraint: StructuredOutputs, text: str) -> bool:
    matcher = new_matcher(llg, grammar_text(constraint))
    return bool(matcher.consume_tokens(tokenizer.encode(text))) and matcher.is_accepting()


def forced(mode: str, *, named: str | None = None, parallel: bool = True) -> StructuredOutputs:
    use = ToolUse((WEATHER, TIME), "[]", mode, named, parallel)  # type: ignore[arg-type]
    constraint = use.constraint(HermesFormat())
    assert constraint is not None and constraint.param == "tools"
    return constraint


def call(name: str, arguments: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>"


def test_a_forced_call_must_name_an_offered_function_with_valid_arguments(llg: Any, tokenizer: Any) -> None:
    required = forced("required")
    paris = call("get_weather", {"city": "Paris", "unit": "C"})
    assert accepts(llg, tokenizer, required, paris)
    assert accepts(llg, tokenizer, required, paris + "\n" + call("get_time", {}))
    assert not accepts(llg, tokenizer, required, call("get_weather", {"city": "Paris"}))  # unit is required
    assert not accepts(llg, tokenizer, required, call("launch", {}))
    assert not accepts(llg, tokenizer, required, "It is sunny.")
    named = forced("named", named="get_time")
    assert accepts(llg, tokenizer, named, call("get_time", {}))
    assert not accepts(llg, tokenizer, named, paris)
    single = forced("required", parallel=False)
    assert not accepts(llg, tokenizer, single, paris + "\n" + call("get_time", {}))
    assert ToolUse((WEATHER,), "[]", "auto").constraint(HermesFormat()) is None


def test_a_forced_call_takes_no_arguments_its_schema_does_not_list(llg: Any, tokenizer: Any) -> None:
    """As vLLM's default grammar (xgrammar's strict mode) reads a schema: an object that does not say
    otherwise takes only its listed properties, so a small model cannot pad a forced call with
    invented keys until max_tokens. Parameters with $defs (pydantic's nested models) compile."""
    required = forced("required")
    assert accepts(llg, tokenizer, required, call("get_time", {}))
    assert not accepts(llg, tokenizer, required, call("get_time", {"description": "now"}))
    assert not accepts(llg, tokenizer, required, call("get_weather", {"city": "Paris", "unit": "C", "x": 1}))
    nested = FunctionSpec(
        "plan",
        {
            "type": "object",
            "properties": {
                "stops": {"type": "array", "items": {"$ref": "#/$defs/stop"}},
                "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
                "properties": {"type": "string", "default": {"type": "object"}},
            },
            "$defs": {"stop": {"type": "object", "properties": {"city": {"type": "string"}}}},
        },
    )
    schema = nested.forced_arguments_schema("#/$defs/arguments_0")
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["stop"]["additionalProperties"] is False
    # pydantic's refs point at the arguments' own root, which the grammar nests in the call object.
    assert schema["properties"]["stops"]["items"] == {"$ref": "#/$defs/arguments_0/$defs/stop"}
    # What the schema decides itself is kept; names and data are not schemas.
    assert schema["properties"]["extra"]["additionalProperties"] == {"type": "integer"}
    assert schema["properties"]["properties"] == {"type": "string", "default": {"type": "object"}}
    assert "additionalProperties" not in schema["properties"]
    assert nested.parameters_schema()["$defs"]["stop"] == {"type": "object", "properties": {"city": {"type": "string"}}}
    plan = ToolUse((nested,), "[]", "named", "plan", False).constraint(HermesFormat())
    assert plan is not None
    stops = call("plan", {"stops": [{"city": "Paris"}], "extra": {"a": 1}, "properties": "x"})
    assert accepts(llg, tokenizer, plan, stops)
    assert not accepts(llg, tokenizer, plan, call("plan", {"stops": [{"city": "Paris", "day": "Mon"}]}))
