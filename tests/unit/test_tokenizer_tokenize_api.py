"""The tokenizer's answers to /tokenize and /detokenize, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import time
from typing import Any

import pytest

from services.tokenizer import tokenize_api
from services.tokenizer.prompt import PromptProcessor
from services.tokenizer.service import TokenizerWorker
from shared.messages import (
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResult,
    RequestFailed,
    TokenizeRequest,
    TokenizeResult,
)
from shared.transport import Delivery, StreamNames

HI = [ChatMessage(role="user", content="hi")]


@pytest.fixture()
def processor(tokenizer: Any) -> PromptProcessor:
    return PromptProcessor(tokenizer, max_model_len=64, eos_token_ids=[2])


def tokenize(processor: PromptProcessor, **fields: Any) -> TokenizeResult | RequestFailed:
    base: dict[str, Any] = {"request_id": "tokn-1", "gateway_id": "gw", "deadline": time.time() + 60}
    return tokenize_api.tokenize(processor, TokenizeRequest(**(base | fields)))


def detokenize(processor: PromptProcessor, tokens: list[int]) -> DetokenizeResult | RequestFailed:
    message = DetokenizeRequest(request_id="tokn-2", gateway_id="gw", deadline=time.time() + 60, tokens=tokens)
    return tokenize_api.detokenize(processor, message)


def test_a_prompt_is_tokenized_as_a_completion_would_be(processor: PromptProcessor, tokenizer: Any) -> None:
    result = tokenize(processor, prompt="Hello world", return_token_strs=True)
    assert isinstance(result, TokenizeResult)
    assert result.tokens == tokenizer.encode("Hello world")
    assert result.max_model_len == 64
    assert result.token_strs == tokenizer.convert_ids_to_tokens(result.tokens) == ["Hello", "Ġworld"]
    completion = CompletionRequest(request_id="c", gateway_id="gw", deadline=time.time() + 60, prompt="Hello world")
    assert processor.process(completion).prompt_token_ids == result.tokens  # type: ignore[union-attr]
    assert tokenize(processor, prompt="x").token_strs is None  # type: ignore[union-attr]


def test_a_chat_is_tokenized_through_the_template(processor: PromptProcessor, tokenizer: Any) -> None:
    result = tokenize(processor, messages=HI)
    assert isinstance(result, TokenizeResult)
    assert tokenizer.decode(result.tokens).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    prefill = HI + [ChatMessage(role="assistant", content="Hel")]
    opened = tokenize(processor, messages=prefill, add_generation_prompt=False, continue_final_message=True)
    assert tokenizer.decode(opened.tokens).endswith("<|im_start|>assistant\nHel")  # type: ignore[union-attr]


def test_tokenize_is_not_held_to_the_context(processor: PromptProcessor) -> None:
    result = tokenize(processor, prompt="word " * 100)
    assert isinstance(result, TokenizeResult) and len(result.tokens) > 64


def test_bad_tokenize_requests_are_400(processor: PromptProcessor) -> None:
    neither = tokenize(processor)
    assert isinstance(neither, RequestFailed) and neither.status == 400
    both = tokenize(processor, messages=HI, continue_final_message=True)
    assert isinstance(both, RequestFailed) and both.param == "continue_final_message"


def test_detokenize_round_trips_and_keeps_special_tokens(processor: PromptProcessor, tokenizer: Any) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHello ✓")
    result = detokenize(processor, ids)
    assert isinstance(result, DetokenizeResult) and result.prompt == "<|im_start|>user\nHello ✓"


def test_detokenize_refuses_ids_outside_the_vocabulary(processor: PromptProcessor) -> None:
    result = detokenize(processor, [5, 49152])
    assert isinstance(result, RequestFailed)
    assert result.status == 400 and result.param == "tokens" and "49152" in result.message


def test_the_worker_answers_on_the_gateways_responses_stream(processor: PromptProcessor) -> None:
    names = StreamNames("t")
    worker = TokenizerWorker(processor, names)
    now = time.time()
    batch = [
        Delivery(
            names.requests, "1-0", TokenizeRequest(request_id="a", gateway_id="gw-1", deadline=now + 9, prompt="x")
        ),
        Delivery(
            names.requests, "2-0", DetokenizeRequest(request_id="b", gateway_id="gw-2", deadline=now + 9, tokens=[9])
        ),
        Delivery(
            names.requests, "3-0", DetokenizeRequest(request_id="c", gateway_id="gw-2", deadline=now - 1, tokens=[9])
        ),
    ]
    out, acks = worker.handle(batch, now)
    assert [(stream, type(message).__name__) for stream, message in out] == [
        ("t:responses:gw-1", "TokenizeResult"),
        ("t:responses:gw-2", "DetokenizeResult"),
    ]
    assert len(acks) == 3  # the late one is acknowledged and dropped
