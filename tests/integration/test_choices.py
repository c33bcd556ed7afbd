"""n > 1 and batched prompts (issue 9, item 1) against the real pipeline with the echo engine,
through the ``openai`` package: choices indexed as vLLM orders them, streamed and not, usage
totals, a refused prompt failing its whole batch, and the limit on n.

The echo engine replays the prompt's tokens, so every choice of a prompt has the same text.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Tell me three things"}]


@pytest.fixture(scope="module")
def client(echo_pipeline: Pipeline) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{echo_pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=60)


def streamed_texts(stream: Any, chat: bool) -> tuple[dict[int, str], dict[int, str | None], Any]:
    """Each choice's text and finish reason, by index, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices  # only the final chunk carries the usage
            usage = chunk.usage
        for choice in chunk.choices:
            text = (choice.delta.content if chat else choice.text) or ""
            texts[choice.index] = texts.get(choice.index, "") + text
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


def test_chat_n3_gives_three_indexed_choices_and_counts_them_all(client: Any) -> None:
    one = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    three = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=3, seed=1)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_chat_n3_streamed(client: Any) -> None:
    one = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, n=3, stream=True, stream_options={"include_usage": True}
    )
    texts, finishes, usage = streamed_texts(stream, chat=True)
    assert texts == {i: one.choices[0].message.content for i in range(3)}
    assert finishes == {i: "length" for i in range(3)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (one.usage.prompt_tokens, 12)


def test_completions_n2(client: Any) -> None:
    reply = client.completions.create(model=MODEL, prompt="one two three four", max_tokens=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text != ""
    assert reply.usage.completion_tokens == 6


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_two_texts(client: Any, stream: bool) -> None:
    prompts = ["alpha beta gamma", "one two three four five"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=3) for p in prompts]
    if stream:
        chunks = client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        texts, _, usage = streamed_texts(chunks, chat=False)
    else:
        reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3)
        assert [c.index for c in reply.choices] == [0, 1]
        texts, usage = {c.index: c.text for c in reply.choices}, reply.usage
    assert texts == {0: singles[0].choices[0].text, 1: singles[1].choices[0].text}
    assert usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_a_batch_of_two_token_id_prompts_with_n2(client: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    prompts = [tokenizer.encode("red green blue"), tokenizer.encode("cat dog bird fish")]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    firsts = [client.completions.create(model=MODEL, prompt=p, max_tokens=2).choices[0].text for p in prompts]
    # prompt_index * n + sample, as OpenAI and vLLM order them
    assert [c.text for c in reply.choices] == [firsts[0], firsts[0], firsts[1], firsts[1]]
    assert reply.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])
    assert reply.usage.completion_tokens == 8


def test_a_too_long_prompt_fails_its_whole_batch_naming_it(echo_pipeline: Pipeline) -> None:
    body = {"model": MODEL, "prompt": [[1, 2, 3], [5] * 20_000], "max_tokens": 2}
    for stream in (False, True):
        reply = httpx.post(f"{echo_pipeline.gateway_url}/v1/completions", json=body | {"stream": stream}, timeout=30)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "prompt[1]"


def test_n_above_the_limit_is_400_naming_it(echo_pipeline: Pipeline, client: Any) -> None:
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=9)  # SCALELLM_MAX_N defaults to 8
    assert refused.value.body["param"] == "n" and "SCALELLM_MAX_N" in refused.value.body["message"]
    best_of = httpx.post(f"{echo_pipeline.gateway_url}/v1/completions", json={"prompt": "x", "best_of": 2}, timeout=30)
    assert best_of.status_code == 400 and best_of.json()["error"]["param"] == "best_of"
