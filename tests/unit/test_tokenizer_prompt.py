"""PromptProcessor with the real SmolLM2 tokenizer: what the engine gets, what the client is told."""

from __future__ import annotations

import time
from typing import Any

import pytest

from services.tokenizer.loading import load_prompt_processor
from services.tokenizer.prompt import PromptProcessor
from shared.messages import (
    ChatMessage,
    CompletionRequest,
    DetokenizeParams,
    RequestFailed,
    SamplingParams,
    TokenizedRequest,
)
from shared.settings import TokenizerSettings


@pytest.fixture()
def processor(tokenizer: Any) -> PromptProcessor:
    return PromptProcessor(tokenizer, max_model_len=64, eos_token_ids=[2])


def request(**fields: Any) -> CompletionRequest:
    base: dict[str, Any] = {"request_id": "cmpl-1", "gateway_id": "gw-1", "deadline": time.time() + 60}
    return CompletionRequest(**(base | fields))


def ok(result: TokenizedRequest | RequestFailed) -> TokenizedRequest:
    assert isinstance(result, TokenizedRequest), result
    return result


def failed(result: TokenizedRequest | RequestFailed) -> RequestFailed:
    assert isinstance(result, RequestFailed), result
    assert result.status == 400
    return result


def test_text_prompt_is_encoded_like_the_model_does(processor: PromptProcessor, tokenizer: Any) -> None:
    out = ok(processor.process(request(prompt="Hello world, 你好 😀")))
    assert out.prompt_token_ids == tokenizer.encode("Hello world, 你好 😀")
    assert tokenizer.decode(out.prompt_token_ids) == "Hello world, 你好 😀"
    assert (out.request_id, out.gateway_id) == ("cmpl-1", "gw-1")


def test_chat_messages_go_through_the_chat_template(processor: PromptProcessor, tokenizer: Any) -> None:
    messages = [ChatMessage(role="user", content="What is 2+2?")]
    out = ok(processor.process(request(messages=messages)))
    text = tokenizer.decode(out.prompt_token_ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids.count(1) == 3  # <|im_start|> is one special token, not text

    without = ok(processor.process(request(messages=messages, add_generation_prompt=False)))
    assert not tokenizer.decode(without.prompt_token_ids).endswith("assistant\n")


def test_token_id_prompt_is_passed_through(processor: PromptProcessor) -> None:
    assert ok(processor.process(request(prompt=[1, 2, 3, 49151]))).prompt_token_ids == [1, 2, 3, 49151]


# Negative ids and ids past int32 never reach the tokenizer: messages refuse them (docs/protocol.md).
@pytest.mark.parametrize("bad_id", [49152, 10**9, 2**31 - 1])
def test_token_ids_outside_the_vocabulary_are_refused(processor: PromptProcessor, bad_id: int) -> None:
    error = failed(processor.process(request(prompt=[5, bad_id])))
    assert error.param == "prompt"
    assert str(bad_id) in error.message and "out of vocabulary" in error.message


def test_stop_token_ids_outside_the_vocabulary_are_refused(processor: PromptProcessor) -> None:
    error = failed(processor.process(request(prompt="hi", sampling=SamplingParams(stop_token_ids=[60000]))))
    assert error.param == "stop_token_ids"


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_is_refused(processor: PromptProcessor, prompt: str | list[int]) -> None:
    error = failed(processor.process(request(prompt=prompt)))
    assert error.param == "prompt" and "empty" in error.message


def test_missing_prompt_and_empty_messages_are_refused(processor: PromptProcessor) -> None:
    assert failed(processor.process(request())).param == "prompt"
    assert failed(processor.process(request(messages=[]))).param == "messages"
    both = request(prompt="x", messages=[ChatMessage(role="user", content="y")])
    assert failed(processor.process(both)).param == "messages"


def test_prompt_plus_max_tokens_over_the_context_names_max_tokens(processor: PromptProcessor) -> None:
    prompt = list(range(100, 150))  # 50 tokens of a 64-token context
    assert ok(processor.process(request(prompt=prompt, sampling=SamplingParams(max_tokens=14))))
    error = failed(processor.process(request(prompt=prompt, sampling=SamplingParams(max_tokens=15))))
    assert error.param == "max_tokens"
    assert error.message == (
        "'max_tokens' is too large: 15. This model's maximum context length is 64 tokens "
        "and your request has 50 input tokens (15 > 64 - 50)."
    )
    assert error.error_type == "invalid_request_error"


def test_prompt_that_fills_the_context_is_refused(processor: PromptProcessor) -> None:
    error = failed(processor.process(request(prompt=list(range(100, 164)), sampling=SamplingParams(max_tokens=1))))
    assert error.param == "prompt"
    assert "maximum context length is 64 tokens" in error.message and "64 input tokens" in error.message

    long_chat = [ChatMessage(role="user", content="word " * 100)]
    assert failed(processor.process(request(messages=long_chat))).param == "messages"


def test_sampling_gets_the_model_eos_and_keeps_the_rest(processor: PromptProcessor) -> None:
    sampling = SamplingParams(max_tokens=5, temperature=0.3, stop_token_ids=[13], seed=7)
    detok = DetokenizeParams(stop=["\n"], include_stop_str_in_output=True)
    out = ok(processor.process(request(prompt="hi", sampling=sampling, detokenize=detok)))
    assert out.sampling.eos_token_ids == [2]
    assert out.sampling.model_dump(exclude={"eos_token_ids"}) == sampling.model_dump(exclude={"eos_token_ids"})
    assert out.detokenize == detok


class _RefusingTemplate:
    """A tokenizer whose chat template rejects the conversation (as real templates do)."""

    def __len__(self) -> int:
        return 100

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * len(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "x" * len(token_ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["x"] * len(ids)

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        from jinja2.exceptions import TemplateError

        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")


def test_chat_template_errors_become_a_400_naming_messages() -> None:
    processor = PromptProcessor(_RefusingTemplate(), max_model_len=64, eos_token_ids=[0])
    error = failed(processor.process(request(messages=[ChatMessage(role="assistant", content="hi")])))
    assert error.param == "messages" and "roles must alternate" in error.message


def test_loading_reads_context_length_and_eos_from_the_model() -> None:
    processor = load_prompt_processor(TokenizerSettings())
    assert processor.max_model_len == 8192
    assert processor.eos_token_ids == [2]
    assert load_prompt_processor(TokenizerSettings(max_model_len=100)).max_model_len == 100


# -- options of vLLM's API (issue 9) ---------------------------------------------------

HI = [ChatMessage(role="user", content="hi")]


def test_max_tokens_defaults_to_the_rest_of_the_context(processor: PromptProcessor) -> None:
    prompt = list(range(100, 150))  # 50 tokens of a 64-token context
    uncapped = SamplingParams(max_tokens=2**31 - 1)
    assert (
        ok(processor.process(request(prompt=prompt, sampling=uncapped, max_tokens_is_default=True))).sampling.max_tokens
        == 14
    )
    capped = SamplingParams(max_tokens=5)
    assert (
        ok(processor.process(request(prompt=prompt, sampling=capped, max_tokens_is_default=True))).sampling.max_tokens
        == 5
    )
    # Given by the client, it is checked, never lowered.
    assert failed(processor.process(request(prompt=prompt, sampling=uncapped))).param == "max_tokens"


def test_min_tokens_over_the_default_max_tokens_names_min_tokens(processor: PromptProcessor) -> None:
    sampling = SamplingParams(max_tokens=2**31 - 1, min_tokens=20)
    error = failed(
        processor.process(request(prompt=list(range(100, 150)), sampling=sampling, max_tokens_is_default=True))
    )
    assert error.param == "min_tokens" and "defaults to 14" in error.message


def test_add_special_tokens_adds_the_bos_on_request(tokenizer: Any) -> None:
    # SmolLM2 adds no BOS of its own; a tokenizer that does shows the option both ways.
    class WithBos:
        def __len__(self) -> int:
            return 10

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return ([0] if add_special_tokens else []) + [5] * len(text)

    processor = PromptProcessor(WithBos(), max_model_len=64, eos_token_ids=[1])  # type: ignore[arg-type]
    assert ok(processor.process(request(prompt="ab"))).prompt_token_ids == [0, 5, 5]
    assert ok(processor.process(request(prompt="ab", add_special_tokens=False))).prompt_token_ids == [5, 5]


def test_continue_final_message_leaves_the_last_turn_open(processor: PromptProcessor, tokenizer: Any) -> None:
    messages = HI + [ChatMessage(role="assistant", content="Once upon")]
    out = ok(processor.process(request(messages=messages, add_generation_prompt=False, continue_final_message=True)))
    assert tokenizer.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\nOnce upon")
    closed = ok(processor.process(request(messages=messages, add_generation_prompt=False)))
    assert tokenizer.decode(closed.prompt_token_ids).endswith("Once upon<|im_end|>\n")
    both = failed(processor.process(request(messages=messages, continue_final_message=True)))
    assert both.param == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(tokenizer: Any) -> None:
    class Recording:
        kwargs: dict[str, Any] = {}

        def __len__(self) -> int:
            return 10

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [3] * len(text)

        def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
            Recording.kwargs = kwargs
            return "chat"

    processor = PromptProcessor(Recording(), max_model_len=64, eos_token_ids=[1])  # type: ignore[arg-type]
    ok(processor.process(request(messages=HI, chat_template_kwargs='{"enable_thinking": false, "x": [1]}')))
    assert Recording.kwargs["enable_thinking"] is False and Recording.kwargs["x"] == [1]
    for bad in ('["not", "an", "object"]', "{not json", '{"chat_template": "{{ 1 }}"}', '{"tokenize": true}'):
        assert failed(processor.process(request(messages=HI, chat_template_kwargs=bad))).param == "chat_template_kwargs"
