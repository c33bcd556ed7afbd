"""Per-request limits: each one a setting, each refusal a 400 naming the parameter and the setting."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from services.gateway.errors import ApiError
from services.gateway.limits import RequestLimits
from services.gateway.protocol import parse_chat, parse_completion
from shared.settings import GatewaySettings

SMALL = RequestLimits(
    max_stop_strings=2,
    max_stop_string_chars=5,
    max_stop_token_ids=2,
    max_n=2,
    max_batch_prompts=2,
    max_top_k=50,
    max_logprobs=3,
    max_chat_messages=2,
    max_prompt_chars=10,
)


def completion(limits: RequestLimits = SMALL, **fields: Any) -> Any:
    return parse_completion(json.dumps({"prompt": "Hello"} | fields).encode(), limits)


def chat(messages: list[dict[str, Any]], limits: RequestLimits = SMALL, **fields: Any) -> Any:
    return parse_chat(json.dumps({"messages": messages} | fields).encode(), limits)


def refusal(call: Any, *args: Any, **fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **fields)
    assert caught.value.status == 400
    return caught.value


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(
    "fields, param, setting, code",
    [
        ({"stop": ["a", "b", "c"]}, "stop", "SCALELLM_MAX_STOP_STRINGS", "array_above_max_length"),
        ({"stop": "abcdef"}, "stop", "SCALELLM_MAX_STOP_STRING_CHARS", "string_above_max_length"),
        ({"stop": ["ok", "abcdef"]}, "stop[1]", "SCALELLM_MAX_STOP_STRING_CHARS", "string_above_max_length"),
        ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids", "SCALELLM_MAX_STOP_TOKEN_IDS", "array_above_max_length"),
        ({"n": 3}, "n", "SCALELLM_MAX_N", "integer_above_max_value"),
        ({"prompt": ["a", "b", "c"]}, "prompt", "SCALELLM_MAX_BATCH_PROMPTS", "array_above_max_length"),
        ({"prompt": [[1], [2], [3]]}, "prompt", "SCALELLM_MAX_BATCH_PROMPTS", "array_above_max_length"),
        ({"prompt": ["ok", "x" * 11]}, "prompt[1]", "SCALELLM_MAX_PROMPT_CHARS", "string_above_max_length"),
        ({"top_k": 51}, "top_k", "SCALELLM_MAX_TOP_K", "integer_above_max_value"),
        ({"top_k": 10**12}, "top_k", "SCALELLM_MAX_TOP_K", "integer_above_max_value"),
        ({"logprobs": 4}, "logprobs", "SCALELLM_MAX_LOGPROBS", "integer_above_max_value"),
        ({"prompt": "x" * 11}, "prompt", "SCALELLM_MAX_PROMPT_CHARS", "string_above_max_length"),
        ({"prompt": ["x" * 11]}, "prompt", "SCALELLM_MAX_PROMPT_CHARS", "string_above_max_length"),
    ],
)
def test_completion_limits_refuse_naming_param_and_setting(
    fields: dict[str, Any], param: str, setting: str, code: str
) -> None:
    error = refusal(completion, **fields)
    assert (error.param, error.code) == (param, code)
    assert setting in error.message and error.message.startswith(f"Invalid value for '{param}'")


def test_completion_values_at_the_limits_are_accepted() -> None:
    body = completion(stop=["abcde", "x"], stop_token_ids=[7, 8], n=1, top_k=50, logprobs=3, prompt="x" * 10)
    assert body.stop_strings == ["abcde", "x"] and body.stop_token_ids == [7, 8] and body.top_k == 50
    assert completion(prompt=list(range(1000))).prompt == list(range(1000))  # token ids: bounded by the context


def test_chat_limits_count_messages_and_all_their_content() -> None:
    assert len(chat([user("12345"), user("67890")]).messages) == 2
    too_many = refusal(chat, [user("a")] * 3)
    assert (too_many.param, too_many.code) == ("messages", "array_above_max_length")
    assert "SCALELLM_MAX_CHAT_MESSAGES" in too_many.message and "got 3" in too_many.message
    too_long = refusal(chat, [user("123456"), {"role": "user", "content": [{"type": "text", "text": "12345"}]}])
    assert (too_long.param, too_long.code) == ("messages", "string_above_max_length")
    assert "SCALELLM_MAX_PROMPT_CHARS" in too_long.message and "got 11" in too_long.message


def test_chat_top_logprobs_and_shared_limits() -> None:
    assert chat([user("hi")], logprobs=True, top_logprobs=3).top_logprobs == 3
    assert refusal(chat, [user("hi")], logprobs=True, top_logprobs=4).param == "top_logprobs"
    assert refusal(chat, [user("hi")], stop=["a", "b", "c"]).param == "stop"
    assert refusal(chat, [user("hi")], stop_token_ids=[1, 2, 3]).param == "stop_token_ids"
    assert refusal(chat, [user("hi")], top_k=51).param == "top_k"


def test_defaults_come_from_the_settings_class() -> None:
    defaults = RequestLimits.defaults()
    assert defaults == RequestLimits.from_settings(GatewaySettings(redis_url="redis://x"))
    assert dataclasses.asdict(defaults) == {
        "max_stop_strings": 64,
        "max_stop_string_chars": 1000,
        "max_stop_token_ids": 256,
        "max_n": 8,
        "max_batch_prompts": 64,
        "max_top_k": 1_000_000,
        "max_logprobs": 20,
        "max_chat_messages": 1000,
        "max_prompt_chars": 1_000_000,
    }
    # The examples, refused by default: one 100 kB stop string, top_k of 10^12.
    assert refusal(completion, defaults, stop="s" * 100_000).code == "string_above_max_length"
    assert refusal(completion, defaults, top_k=10**12).param == "top_k"


def test_each_limit_is_a_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in dataclasses.fields(RequestLimits):
        monkeypatch.setenv(f"SCALELLM_{field.name.upper()}", "1")
    limits = RequestLimits.from_settings(GatewaySettings())
    assert set(dataclasses.asdict(limits).values()) == {1}


@pytest.mark.parametrize(
    "name, value", [("max_n", "129"), ("max_batch_prompts", "4097"), ("max_logprobs", "21"), ("max_top_k", "0")]
)
def test_limits_the_pipeline_cannot_honour_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from shared.settings import load_settings

    monkeypatch.setenv(f"SCALELLM_{name.upper()}", value)
    with pytest.raises(SystemExit, match=f"SCALELLM_{name.upper()}"):
        load_settings(GatewaySettings)


def test_integers_past_64_bits_are_refused_before_they_reach_the_wire() -> None:
    for field in ("max_tokens", "min_tokens", "top_k", "n"):
        assert refusal(completion, RequestLimits.defaults(), **{field: 2**64}).param == field
    assert refusal(chat, [user("hi")], max_completion_tokens=2**64).param == "max_completion_tokens"
