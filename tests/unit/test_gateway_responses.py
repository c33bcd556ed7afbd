"""OpenAI response bodies, SSE chunks and logprobs shapes: pure builders (metrics: test_gateway_metrics.py)."""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import ApiError
from services.gateway.responses import CollectedOutput, ResponseBuilder, sse_error, usage_body
from shared.messages import TextDelta, Usage


def decode(chunk: bytes) -> Any:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    return json.loads(chunk[6:])


def test_completion_chunks_carry_text_and_finish_reason() -> None:
    builder = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=False, include_usage=False)
    first = decode(builder.text_chunk("Hel", TextDelta(request_id="cmpl-1", text="Hel")))
    assert first["object"] == "text_completion" and first["id"] == "cmpl-1" and first["model"] == "m"
    assert first["choices"] == [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]
    assert "usage" not in first
    last = decode(builder.text_chunk("lo", TextDelta(request_id="cmpl-1", text="lo", finish_reason="length")))
    assert last["choices"][0]["finish_reason"] == "length"


def test_chat_chunks_role_first_then_content_deltas() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, logprobs=False, include_usage=True)
    role = decode(builder.role_chunk())
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["usage"] is None  # present but null when include_usage, as OpenAI does
    end = decode(builder.text_chunk("", TextDelta(request_id="chatcmpl-1", text="", finish_reason="stop")))
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] == "stop"
    usage = decode(builder.usage_chunk({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_full_chat_response_shape() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, logprobs=False, include_usage=False)
    output = CollectedOutput()
    output.add(TextDelta(request_id="x", text="Hi", token_ids=[1]), chat=True)
    output.add(
        TextDelta(
            request_id="x",
            text=" there",
            token_ids=[2],
            finish_reason="stop",
            usage=Usage(prompt_tokens=4, completion_tokens=2),
        ),
        chat=True,
    )
    body = builder.full_response(output)
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_echo_prefix_and_usage_fallback() -> None:
    output = CollectedOutput("Q: ")
    output.add(TextDelta(request_id="x", text="A", token_ids=[5, 6], finish_reason="stop"), chat=False)
    assert output.text == "Q: A"
    # A final delta without usage still gives a truthful completion count.
    assert usage_body(output.usage, output.completion_tokens) == {
        "prompt_tokens": 0,
        "completion_tokens": 2,
        "total_tokens": 2,
    }


def test_completion_logprobs_use_token_id_names_and_text_offsets() -> None:
    builder = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=True, include_usage=False)
    output = CollectedOutput()
    output.add(
        TextDelta(
            request_id="x", text="ab", token_ids=[7, 8], logprobs=[(-0.1, [(7, -0.1), (9, -2.0)]), (-0.2, [(3, -0.05)])]
        ),
        chat=False,
    )
    output.add(
        TextDelta(request_id="x", text="c", token_ids=[4], finish_reason="stop", logprobs=[(float("-inf"), [])]),
        chat=False,
    )
    logprobs = builder.full_response(output)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["token_id:7", "token_id:8", "token_id:4"]
    assert logprobs["token_logprobs"] == [-0.1, -0.2, -9999.0]  # -inf is not JSON
    assert logprobs["top_logprobs"][0] == {"token_id:7": -0.1, "token_id:9": -2.0}
    assert logprobs["top_logprobs"][1] == {"token_id:3": -0.05, "token_id:8": -0.2}  # sampled token included
    assert logprobs["text_offset"] == [0, 0, 2]
    json.dumps(builder.full_response(output), allow_nan=False)


def test_chat_logprobs_stream_chunk() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, logprobs=True, include_usage=False)
    chunk = decode(
        builder.text_chunk(
            "x", TextDelta(request_id="r", text="x", token_ids=[11], logprobs=[(-1.0, [(11, -1.0), (12, -1.5)])])
        )
    )
    content = chunk["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "token_id:11",
            "logprob": -1.0,
            "bytes": None,
            "top_logprobs": [
                {"token": "token_id:11", "logprob": -1.0, "bytes": None},
                {"token": "token_id:12", "logprob": -1.5, "bytes": None},
            ],
        }
    ]


def test_sse_error_event_ends_the_stream() -> None:
    raw = sse_error(ApiError(500, "boom", type="server_error"))
    first, done = raw.split(b"\n\n")[:2]
    assert json.loads(first[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert done == b"data: [DONE]"
