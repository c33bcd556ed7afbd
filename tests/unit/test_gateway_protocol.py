"""OpenAI request validation: what is accepted, what it becomes, and the exact 400 for what is not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.gateway.errors import ApiError
from services.gateway.protocol import check_model, parse_chat, parse_completion
from services.gateway.to_pipeline import NO_MAX_TOKENS_CAP, detokenize_params, pipeline_request, sampling_params

USER = [{"role": "user", "content": "Hi"}]


def completion(**fields: Any) -> Any:
    return parse_completion(json.dumps({"prompt": "Hello"} | fields).encode())


def chat(**fields: Any) -> Any:
    return parse_chat(json.dumps({"messages": USER} | fields).encode())


def rejected(parse: Any, body: Any) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as caught:
        parsed = parse(raw)
        sampling_params(parsed, default_max_tokens=16)
    return caught.value


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Hello", "Hello"),
        (["Hello"], "Hello"),
        ([1, 2, 3], [1, 2, 3]),
        ([[1, 2, 3]], [1, 2, 3]),
        (["a", "b"], ["a", "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms_accepted(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        [],
        ["a", ""],
        [[1], []],
        [[1], [-1]],
        ["a", [1]],
        [1, "a"],
        [["a"]],
        [[[1]]],
        [[]],
        [-1],
        [1.5],
        [True],
        5,
        None,
    ],
)
def test_bad_prompts_are_400_on_prompt(prompt: Any) -> None:
    error = rejected(parse_completion, {"prompt": prompt})
    assert (error.status, error.param) == (400, "prompt")


def test_sampling_options_map_to_sampling_params() -> None:
    body = completion(
        max_tokens=9,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        seed=7,
        stop_token_ids=[2],
        ignore_eos=True,
        min_tokens=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logprobs=2,
    )
    sampling = sampling_params(body, default_max_tokens=16)
    assert sampling.max_tokens == 9 and sampling.temperature == 0.0 and sampling.top_p == 0.5
    assert sampling.top_k == 0  # vLLM's -1 (no limit) is our 0
    assert (sampling.min_p, sampling.seed, sampling.stop_token_ids) == (0.1, 7, [2])
    assert sampling.ignore_eos and sampling.min_tokens == 3
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -0.5, 1.1)
    assert sampling.logprobs == 2


def test_unset_and_null_options_keep_defaults() -> None:
    sampling = sampling_params(completion(temperature=None, top_p=None, max_tokens=None), default_max_tokens=42)
    assert sampling.max_tokens == 42 and sampling.temperature == 1.0 and sampling.top_p == 1.0
    assert sampling.logprobs is None


def test_stop_and_detokenize_options() -> None:
    assert detokenize_params(completion(stop="\n")).stop == ["\n"]
    many = [f"s{i}" for i in range(10)]  # more than OpenAI's 4 is fine
    params = detokenize_params(completion(stop=many, include_stop_str_in_output=True, skip_special_tokens=False))
    assert params.stop == many and params.include_stop_str_in_output and not params.skip_special_tokens
    assert detokenize_params(completion()).stop == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", "0.5"),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2),
        ("max_tokens", 0),
        ("max_tokens", 1.0),
        ("max_tokens", "10"),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0),
        ("stop", [1]),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop_token_ids", 5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("ignore_eos", 1),
        ("stream", "yes"),
        ("n", 9),
        ("best_of", 3),
        ("min_tokens", -1),
        ("seed", 2**70),
        ("logit_bias", {"5": 1.0}),
        ("suffix", "end"),
    ],
)
def test_bad_completion_options_are_400_naming_the_param(field: str, value: Any) -> None:
    raw = json.dumps({"prompt": "x", field: value}, allow_nan=True).encode()
    error = rejected(parse_completion, raw)
    assert (error.status, error.param) == (400, field)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_a_bad_list_item_is_named_by_index() -> None:
    assert rejected(parse_completion, {"prompt": "x", "stop_token_ids": [1, -1]}).param == "stop_token_ids[1]"


def test_min_tokens_above_max_tokens_is_refused() -> None:
    error = rejected(parse_completion, {"prompt": "x", "max_tokens": 2, "min_tokens": 5})
    assert error.param == "min_tokens"


def test_malformed_bodies() -> None:
    assert rejected(parse_completion, b"{not json").body()["error"]["code"] == "invalid_json"
    not_object = rejected(parse_completion, b"[1, 2]")
    assert not_object.status == 400 and not_object.param is None
    missing = rejected(parse_completion, {"max_tokens": 3})
    assert (missing.param, missing.code) == ("prompt", "missing_required_parameter")


def test_stream_options_need_stream() -> None:
    assert (
        rejected(parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}).param == "stream_options"
    )
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not completion(stream=True).include_usage


def test_echo_with_logprobs_and_max_tokens_zero_scores_the_prompt() -> None:
    assert completion(echo=True).echo
    scoring = parse_completion(json.dumps({"prompt": [1, 2], "echo": True, "logprobs": 1, "max_tokens": 0}).encode())
    assert scoring.max_tokens == 0 and scoring.requested_prompt_logprobs() == 1
    # prompt_logprobs asks on its own; with echo and logprobs, the larger of the two is computed.
    both = {"prompt": "x", "echo": True, "logprobs": 2, "prompt_logprobs": 5}
    assert parse_completion(json.dumps(both).encode()).requested_prompt_logprobs() == 5
    assert parse_completion(json.dumps({"prompt": "x", "logprobs": 2}).encode()).requested_prompt_logprobs() is None
    zero = rejected(parse_completion, {"prompt": "x", "max_tokens": 0})
    assert zero.param == "max_tokens" and "echo" in zero.message
    assert rejected(parse_chat, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).param == "max_tokens"


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_logprobs_are_bounded_and_not_streamed(chat: bool) -> None:
    parse = parse_chat if chat else parse_completion
    base: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    assert parse(json.dumps(base | {"prompt_logprobs": 20}).encode()).prompt_logprobs == 20
    over = rejected(parse, base | {"prompt_logprobs": 21})
    assert over.param == "prompt_logprobs" and "SCALELLM_MAX_LOGPROBS" in over.message
    assert rejected(parse, base | {"prompt_logprobs": -1}).param == "prompt_logprobs"
    assert rejected(parse, base | {"prompt_logprobs": 1, "stream": True}).param == "prompt_logprobs"


def test_chat_content_may_be_text_parts_and_developer_means_system() -> None:
    body = parse_chat(
        json.dumps(
            {
                "messages": [
                    {"role": "developer", "content": "Rules"},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": None},
                ]
            }
        ).encode()
    )
    assert [(m.role, m.content) for m in body.chat_messages()] == [
        ("system", "Rules"),
        ("user", "a\nb"),
        ("assistant", ""),
    ]


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("Hi", "messages"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[1].content",
        ),
    ],
)
def test_bad_chat_messages_name_the_message(messages: Any, param: str) -> None:
    error = rejected(parse_chat, {"messages": messages})
    assert (error.status, error.param) == (400, param)


def test_chat_max_completion_tokens_wins_and_logprobs_map() -> None:
    body = chat(max_tokens=5, max_completion_tokens=8, logprobs=True, top_logprobs=3)
    sampling = sampling_params(body, default_max_tokens=16)
    assert sampling.max_tokens == 8 and sampling.logprobs == 3
    assert sampling_params(chat(logprobs=True), 16).logprobs == 0
    assert sampling_params(chat(logprobs=False), 16).logprobs is None


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"n": 9}, "n"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a+"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),  # json_object and json_schema: issue 10
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_bad_chat_options(fields: dict[str, Any], param: str) -> None:
    assert rejected(parse_chat, {"messages": USER} | fields).param == param


def test_unknown_fields_and_user_are_ignored() -> None:
    assert chat(user="alice", some_vendor_option=True).stream is False
    assert chat(add_generation_prompt=False).add_generation_prompt is False


def test_model_check() -> None:
    check_model(None, {"m"})
    check_model("m", {"m"})
    with pytest.raises(ApiError) as caught:
        check_model("other", {"m"})
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "model_not_found", "model")


# -- options of vLLM's API (issue 9, item 5) ---------------------------------------------


def test_without_max_tokens_the_request_asks_the_tokenizer_for_the_rest_of_the_context() -> None:
    uncapped = pipeline_request(completion(), "cmpl-1", "gw", 1.0, default_max_tokens=None)
    assert uncapped.max_tokens_is_default and uncapped.sampling.max_tokens == NO_MAX_TOKENS_CAP
    capped = pipeline_request(chat(), "chatcmpl-1", "gw", 1.0, default_max_tokens=100)
    assert capped.max_tokens_is_default and capped.sampling.max_tokens == 100
    given = pipeline_request(chat(max_completion_tokens=7), "chatcmpl-2", "gw", 1.0, default_max_tokens=100)
    assert not given.max_tokens_is_default and given.sampling.max_tokens == 7


def test_chat_options_reach_the_pipeline_request() -> None:
    body = chat(
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs={"enable_thinking": False},
        add_special_tokens=True,
        spaces_between_special_tokens=False,
    )
    message = pipeline_request(body, "chatcmpl-1", "gw", 1.0, default_max_tokens=None)
    assert (message.add_generation_prompt, message.continue_final_message) == (False, True)
    assert json.loads(message.chat_template_kwargs or "") == {"enable_thinking": False}
    assert message.add_special_tokens is True and message.detokenize.spaces_between_special_tokens is False
    plain = pipeline_request(completion(), "cmpl-1", "gw", 1.0, default_max_tokens=None)
    assert plain.add_special_tokens is None and plain.chat_template_kwargs is None and plain.prompt == "Hello"


def test_continue_final_message_needs_add_generation_prompt_false() -> None:
    error = rejected(parse_chat, {"messages": USER, "continue_final_message": True})
    assert error.param == "continue_final_message" and "add_generation_prompt" in error.message


def test_stream_options_continuous_usage_stats() -> None:
    streamed = completion(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert streamed.include_usage and streamed.continuous_usage
    without_usage = completion(stream=True, stream_options={"continuous_usage_stats": True})
    assert not without_usage.continuous_usage  # as vLLM: only together with include_usage


def test_unknown_fields_are_noted_at_every_level() -> None:
    body = chat(
        messages=[{"role": "user", "content": "Hi", "refusal": "bob"}],
        stream=True,
        stream_options={"include_usage": True, "chunk_size": 3},
        guided_decoding_backend="xgrammar",  # vLLM's, not ours (guided_json is known since issue 10)
    )
    assert body.unknown_fields() == ["guided_decoding_backend", "messages[].refusal", "stream_options.chunk_size"]
    assert completion().unknown_fields() == []


def test_echo_scoring_reaches_the_pipeline_as_prefill_only_with_prompt_logprobs() -> None:
    body = completion(prompt=[5, 6, 7], echo=True, logprobs=3, max_tokens=0)
    message = pipeline_request(body, "cmpl-1", "gw", 1.0, default_max_tokens=None)
    assert message.sampling.max_tokens == 0 and not message.max_tokens_is_default
    assert message.sampling.logprobs == 3 and message.sampling.prompt_logprobs == 3
    assert message.detokenize.decode_prompt  # the echo of token ids needs their text
    text = pipeline_request(completion(echo=True), "cmpl-2", "gw", 1.0, default_max_tokens=None)
    assert not text.detokenize.decode_prompt and text.sampling.prompt_logprobs is None  # the gateway has it
    chat_message = pipeline_request(chat(prompt_logprobs=2), "chatcmpl-1", "gw", 1.0, default_max_tokens=None)
    assert chat_message.sampling.prompt_logprobs == 2 and chat_message.sampling.logprobs is None
