"""OpenAI response bodies, SSE chunks and logprobs shapes: pure builders (metrics: test_gateway_metrics.py)."""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import ApiError
from services.gateway.responses import LogprobsOptions, ResponseBuilder, sse_error, usage_body
from shared.messages import NamedToken, TextDelta, Usage


def decode(chunk: bytes) -> Any:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    return json.loads(chunk[6:])


def test_completion_chunks_carry_text_and_finish_reason() -> None:
    builder = ResponseBuilder("cmpl-1", "m", chat=False)
    first = decode(builder.text_chunk("Hel", TextDelta(request_id="cmpl-1", text="Hel")))
    assert first["object"] == "text_completion" and first["id"] == "cmpl-1" and first["model"] == "m"
    assert first["choices"] == [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]
    assert "usage" not in first
    last = decode(builder.text_chunk("lo", TextDelta(request_id="cmpl-1", text="lo", finish_reason="length")))
    assert last["choices"][0]["finish_reason"] == "length"


def test_chat_chunks_role_first_then_content_deltas() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, include_usage=True)
    role = decode(builder.role_chunk())
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["usage"] is None  # present but null when include_usage, as OpenAI does
    end = decode(builder.text_chunk("", TextDelta(request_id="chatcmpl-1", text="", finish_reason="stop")))
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] == "stop"
    usage = decode(builder.usage_chunk({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_full_chat_response_shape() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True)
    output = builder.collector()
    output.add(TextDelta(request_id="x", text="Hi", token_ids=[1]))
    output.add(
        TextDelta(
            request_id="x",
            text=" there",
            token_ids=[2],
            finish_reason="stop",
            usage=Usage(prompt_tokens=4, completion_tokens=2),
        )
    )
    body = builder.full_response(output)
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert "prompt_logprobs" not in body  # only when asked for


def test_echo_prefix_and_usage_fallback() -> None:
    output = ResponseBuilder("cmpl-1", "m", chat=False, echo=True, prompt="Q: ").collector()
    output.add(TextDelta(request_id="x", text="A", token_ids=[5, 6], finish_reason="stop"))
    assert output.text == "Q: A"
    # A final delta without usage still gives a truthful completion count.
    assert usage_body(output.usage, output.completion_tokens) == {
        "prompt_tokens": 0,
        "completion_tokens": 2,
        "total_tokens": 2,
    }


def named(token_id: int, text: str, offset: int, logprob: float | None, *alternatives: Any) -> NamedToken:
    return (token_id, text, offset, logprob, None, list(alternatives))


def test_completion_logprobs_name_tokens_by_text_with_exact_offsets() -> None:
    builder = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=LogprobsOptions(top=1))
    output = builder.collector()
    output.add(
        TextDelta(
            request_id="x",
            text=" héllo",
            token_ids=[7, 8],
            named_logprobs=[
                named(7, " h", 0, -0.1, (7, " h", -0.1), (9, " H", -2.0)),
                named(8, "éllo", 2, -0.2, (3, "ello", -0.05)),
            ],
        )
    )
    output.add(
        TextDelta(
            request_id="x",
            text="",
            token_ids=[2],
            finish_reason="stop",
            named_logprobs=[named(2, "<|im_end|>", 6, float("-inf"))],
        )
    )
    logprobs = builder.full_response(output)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" h", "éllo", "<|im_end|>"]
    assert logprobs["token_logprobs"] == [-0.1, -0.2, -9999.0]  # -inf is not JSON
    # The token first, then the top alternatives (the sampled one once): up to logprobs + 1 entries.
    assert logprobs["top_logprobs"] == [{" h": -0.1}, {"éllo": -0.2, "ello": -0.05}, {"<|im_end|>": -9999.0}]
    assert logprobs["text_offset"] == [0, 2, 6]
    json.dumps(builder.full_response(output), allow_nan=False)


def test_echo_scoring_puts_the_prompt_tokens_first_and_offsets_output_after_it() -> None:
    builder = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=LogprobsOptions(top=1), echo=True, prompt="Hi you")
    prompt = [
        named(10, "Hi", 0, None),
        (11, " you", 2, -3.5, 40, [(12, " there", -0.5), (11, " you", -3.5)]),
    ]
    first = TextDelta(request_id="x", text=" ok", token_ids=[13], prompt_logprobs=prompt)
    first.named_logprobs = [named(13, " ok", 0, -0.7, (13, " ok", -0.7))]
    streamed = decode(builder.echo_chunk(first))["choices"][0]
    assert streamed["text"] == "Hi you" and streamed["logprobs"]["tokens"] == ["Hi", " you"]
    assert streamed["logprobs"]["token_logprobs"] == [None, -3.5]
    assert streamed["logprobs"]["top_logprobs"] == [None, {" you": -3.5, " there": -0.5}]
    assert decode(builder.text_chunk(" ok", first))["choices"][0]["logprobs"]["text_offset"] == [6]
    output = builder.collector()
    output.add(first)
    output.add(
        TextDelta(request_id="x", text="", finish_reason="length", usage=Usage(prompt_tokens=2, completion_tokens=1))
    )
    choice = builder.full_response(output)["choices"][0]
    assert choice["text"] == "Hi you ok"
    assert choice["logprobs"]["tokens"] == ["Hi", " you", " ok"]
    assert choice["logprobs"]["text_offset"] == [0, 2, 6]
    assert "prompt_logprobs" not in choice


def test_prompt_logprobs_in_vllm_shape_and_the_echo_of_token_ids() -> None:
    options = LogprobsOptions(prompt_top=1)
    prompt = [named(10, "Hi", 0, None), (11, " you", 2, -3.5, 40, [(12, " there", -0.5), (11, " you", -3.5)])]
    builder = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=options, echo=True)
    output = builder.collector()
    output.add(TextDelta(request_id="x", text="", finish_reason="length", prompt_logprobs=prompt, prompt_text="Hi you"))
    choice = builder.full_response(output)["choices"][0]
    assert choice["text"] == "Hi you" and choice["logprobs"] is None
    assert choice["prompt_logprobs"] == [
        None,
        {
            "11": {"logprob": -3.5, "rank": 40, "decoded_token": " you"},
            "12": {"logprob": -0.5, "rank": 1, "decoded_token": " there"},
        },
    ]
    chat = ResponseBuilder("chatcmpl-1", "m", chat=True, logprobs=options)
    chat_output = chat.collector()
    chat_output.add(TextDelta(request_id="x", text="A", token_ids=[4], finish_reason="length", prompt_logprobs=prompt))
    assert chat.full_response(chat_output)["prompt_logprobs"] == choice["prompt_logprobs"]  # on the response


def test_chat_logprobs_stream_chunk_with_bytes() -> None:
    builder = ResponseBuilder("chatcmpl-1", "m", chat=True, logprobs=LogprobsOptions(top=2))
    delta = TextDelta(
        request_id="r",
        text="é",
        token_ids=[11],
        named_logprobs=[named(11, "é", 0, -1.0, (11, "é", -1.0), (12, "", -1.5))],
    )
    content = decode(builder.text_chunk("é", delta))["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "é",
            "logprob": -1.0,
            "bytes": [195, 169],
            "top_logprobs": [
                {"token": "é", "logprob": -1.0, "bytes": [195, 169]},
                {"token": "", "logprob": -1.5, "bytes": []},  # a piece of a character: named ""
            ],
        }
    ]


def test_tokens_as_ids_and_deltas_with_ids_only() -> None:
    as_ids = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=LogprobsOptions(top=1, as_token_ids=True))
    delta = TextDelta(
        request_id="r", text="é", token_ids=[11], named_logprobs=[named(11, "é", 0, -1.0, (12, "e", -2.0))]
    )
    logprobs = decode(as_ids.text_chunk("é", delta))["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["token_id:11"] and logprobs["top_logprobs"] == [
        {"token_id:11": -1.0, "token_id:12": -2.0}
    ]
    # A detokenizer older than named logprobs sends ids: named by id, at the offset of the delta's text.
    plain = ResponseBuilder("cmpl-1", "m", chat=False, logprobs=LogprobsOptions(top=1))
    old = TextDelta(request_id="r", text="b", token_ids=[7], offset=4, logprobs=[(-0.5, [(9, -0.1)])])
    logprobs = decode(plain.text_chunk("b", old))["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["token_id:7"] and logprobs["text_offset"] == [4]
    assert logprobs["top_logprobs"] == [{"token_id:7": -0.5, "token_id:9": -0.1}]


def test_sse_error_event_ends_the_stream() -> None:
    raw = sse_error(ApiError(500, "boom", type="server_error"))
    first, done = raw.split(b"\n\n")[:2]
    assert json.loads(first[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert done == b"data: [DONE]"
