"""Every message type survives the wire, and foreign bytes never become objects."""

from __future__ import annotations

import msgpack
import pytest

from shared.messages import (
    MESSAGE_TYPES,
    AbortRequests,
    ChatMessage,
    CompletionRequest,
    DecodeCheckpoint,
    DetokenizeParams,
    DetokenizeRequest,
    DetokenizeResult,
    EngineStepOutput,
    Heartbeat,
    Message,
    MessageError,
    RequestFailed,
    ResponseBatch,
    SamplingParams,
    TextDelta,
    TokenDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResult,
    ToolCall,
    Usage,
    decode,
    encode,
)

SAMPLING = SamplingParams(
    max_tokens=32,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=7,
    stop_token_ids=[5],
    eos_token_ids=[2],
    ignore_eos=True,
    min_tokens=3,
    logprobs=2,
    prompt_logprobs=1,
)
DETOK = DetokenizeParams(
    stop=["\n\n", "END"],
    include_stop_str_in_output=True,
    skip_special_tokens=False,
    spaces_between_special_tokens=False,
)

EXAMPLES: list[Message] = [
    CompletionRequest(
        request_id="cmpl-1", gateway_id="gw", deadline=1.5, prompt="Hello", sampling=SAMPLING, detokenize=DETOK
    ),
    CompletionRequest(request_id="cmpl-2", gateway_id="gw", deadline=1.5, prompt=[1, 2, 3]),
    CompletionRequest(
        request_id="chat-1",
        gateway_id="gw",
        deadline=2.0,
        messages=[ChatMessage(role="user", content="hi ✓")],
        add_generation_prompt=False,
    ),
    TokenizedRequest(
        request_id="r", gateway_id="gw", deadline=3.0, prompt_token_ids=[1, 2], sampling=SAMPLING, detokenize=DETOK
    ),
    EngineStepOutput(
        engine_id="e0",
        step=12,
        deltas=[
            TokenDelta(
                request_id="a",
                gateway_id="gw",
                offset=0,
                token_ids=[7],
                prompt_tokens=4,
                detokenize=DETOK,
                prompt_tail=[1, 2],
            ),
            TokenDelta(
                request_id="b",
                gateway_id="gw2",
                offset=9,
                token_ids=[8, 9],
                prompt_tokens=5,
                finish_reason="length",
                logprobs=[(-0.5, [(8, -0.5), (3, -1.25)]), (-0.1, [])],
            ),
            TokenDelta(
                request_id="c",
                gateway_id="gw",
                offset=0,
                token_ids=[],
                prompt_tokens=3,
                finish_reason="length",
                detokenize=DetokenizeParams(decode_prompt=True),
                prompt_token_ids=[4, 5, 6],
                prompt_logprobs=[None, (-2.5, 7, [(9, -0.5)]), (-0.25, 1, [])],
            ),
        ],
    ),
    ResponseBatch(
        deltas=[
            TextDelta(request_id="a", text="hé", token_ids=[7], offset=12, prompt_tokens=5),
            TextDelta(
                request_id="b", text="", finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=11)
            ),
            TextDelta(
                request_id="c",
                text=" 😀",
                token_ids=[8, 9],
                named_logprobs=[(8, "", 0, -0.5, None, [(8, "", -0.5)]), (9, " 😀", 0, -0.1, None, [])],
                prompt_logprobs=[(4, "Hi", 0, None, None, []), (5, " there", 2, -2.5, 7, [(9, " you", -0.5)])],
                prompt_text="Hi there",
            ),
        ]
    ),
    RequestFailed(
        request_id="r", status=400, error_type="invalid_request_error", message="too long", param="max_tokens"
    ),
    AbortRequests(request_ids=["a", "b"], reason="stop_string"),
    DecodeCheckpoint(
        request_id="a",
        gateway_id="gw",
        detokenize=DETOK,
        num_tokens=9,
        window=[40, 41, 226],
        read_offset=2,
        text_offset=17,
        text_tail="Отк",
        sent=1,
        unsent_token_ids=[226],
        unsent_named=[(226, "", 20, -0.5, None, [(226, "", -0.5)])],
    ),
    DecodeCheckpoint(  # as an older version wrote it
        request_id="c",
        gateway_id="gw",
        detokenize=DETOK,
        num_tokens=1,
        unsent_token_ids=[226],
        unsent_logprobs=[(-0.5, [(226, -0.5)])],
    ),
    DecodeCheckpoint(
        request_id="b",
        gateway_id="gw",
        detokenize=DetokenizeParams(),
        num_tokens=3,
        finish_reason="stop",
        stopped_by_string=True,
    ),
    Heartbeat(role="engine", replica_id="e0", time=123.0, running=3, waiting=1, kv_usage=0.5, forward_share=0.9),
    Heartbeat(role="tokenizer", replica_id="t0", time=124.0, max_model_len=8192),
    TokenizeRequest(request_id="tokn-1", gateway_id="gw", deadline=1.0, prompt="Hello", add_special_tokens=False),
    TokenizeRequest(
        request_id="tokn-2",
        gateway_id="gw",
        deadline=1.0,
        messages=[ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="Hel")],
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs="{}",
        return_token_strs=True,
    ),
    TokenizeResult(request_id="tokn-1", tokens=[19556], max_model_len=8192),
    TokenizeResult(request_id="tokn-2", tokens=[1, 2], max_model_len=2048, token_strs=["<s>", "Ġhé"]),
    DetokenizeRequest(request_id="tokn-3", gateway_id="gw", deadline=1.0, tokens=[19556, 2]),
    DetokenizeResult(request_id="tokn-3", prompt="Hello ✓"),
    CompletionRequest(
        request_id="chat-2",
        gateway_id="gw",
        deadline=2.0,
        messages=[ChatMessage(role="assistant", content="Once upon")],
        add_generation_prompt=False,
        continue_final_message=True,
        add_special_tokens=True,
        chat_template_kwargs='{"enable_thinking": false}',
        max_tokens_is_default=True,
    ),
    CompletionRequest(
        request_id="chat-tools",
        gateway_id="gw",
        deadline=2.0,
        messages=[
            ChatMessage(role="user", content="Weather in Paris?"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
            ),
            ChatMessage(role="tool", content="21 C", tool_call_id="call_1", name="get_weather"),
        ],
        tools='[{"type": "function", "function": {"name": "get_weather"}}]',
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip_gives_an_equal_message(message: Message) -> None:
    decoded = decode(encode(message))
    assert type(decoded) is type(message)
    assert decoded == message


def test_every_registered_type_has_a_round_trip_example() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(MESSAGE_TYPES)


def test_the_type_tag_is_on_the_wire_for_other_languages() -> None:
    fields = msgpack.unpackb(encode(AbortRequests(request_ids=["x"])))
    assert fields == {"type": "abort_requests", "request_ids": ["x"], "reason": "abort"}


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    data = msgpack.packb({"type": "abort_requests", "request_ids": ["x"], "priority": 3})
    assert decode(data) == AbortRequests(request_ids=["x"])


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"request_ids": ["x"]}),  # no tag
        msgpack.packb({"type": "os.system", "args": ["rm -rf /"]}),
        msgpack.packb({"type": "__class__"}),
        msgpack.packb({"type": "abort_requests", "request_ids": "not-a-list"}),
        msgpack.packb({"type": "tokenized_request", "request_id": "r"}),  # fields missing
    ],
)
def test_foreign_bytes_raise_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


def test_out_of_range_sampling_values_are_rejected_on_decode() -> None:
    fields = msgpack.unpackb(encode(EXAMPLES[3]))
    fields["sampling"]["temperature"] = -1.0
    with pytest.raises(MessageError, match="temperature"):
        decode(msgpack.packb(fields))
