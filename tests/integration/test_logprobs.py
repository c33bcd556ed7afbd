"""Logprobs as vLLM returns them (issue 9, item 2), against the real pipeline with the echo engine,
through the ``openai`` package: tokens named by their text, exact text offsets, chat bytes, echo
scoring (echo, logprobs, max_tokens 0), vLLM's prompt_logprobs, and the limits.

The echo engine replays the prompt's tokens, each with logprob 0 and itself as the top alternative,
so every name, offset and byte here can be computed from the tokenizer alone.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

MODEL = "SmolLM2-135M-Instruct"
# Plain words, an accent, an emoji split over three tokens, CJK characters split over two.
PROMPT = "Héllo wörld 😀 and 中文字符"


@pytest.fixture(scope="module")
def client(echo_pipeline: Pipeline) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{echo_pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=60)


def names_of(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """What each token is named: its text, and "" for a piece of a character its last piece completes."""
    names, done = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        complete = text.rstrip("\ufffd")
        names.append(complete[len(done) :] if not text.endswith("\ufffd") else "")
        done = complete if not text.endswith("\ufffd") else done
    return names


def assert_offsets_place_each_token(text: str, tokens: list[str], offsets: list[int]) -> None:
    assert offsets == sorted(offsets)
    for token, offset in zip(tokens, offsets):
        assert text[offset : offset + len(token)] == token


def test_completion_logprobs_name_tokens_by_text_with_exact_offsets(
    client: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = tokenizer.encode(PROMPT)
    expected = names_of(tokenizer, ids)
    assert "" in expected and " 😀" in expected  # the emoji's first piece is named ""
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=len(ids), logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPT
    logprobs = choice.logprobs
    assert logprobs.tokens == expected and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs == [0.0] * len(ids)
    assert logprobs.top_logprobs == [{name: 0.0} for name in expected]  # the token, its own top alternative
    assert_offsets_place_each_token(choice.text, logprobs.tokens, logprobs.text_offset)
    assert "\ufffd" not in json.dumps(reply.model_dump())

    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=len(ids), logprobs=2, stream=True)
    tokens, offsets, text = [], [], ""
    for chunk in streamed:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert text == PROMPT and tokens == expected and offsets == logprobs.text_offset


def test_chat_logprobs_carry_token_text_and_utf8_bytes(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "日本語 ok 😀"}],
        max_tokens=60,
        logprobs=True,
        top_logprobs=1,
        extra_body={"ignore_eos": True},  # past the system turn's end, to the user's words
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert content, choice
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == 0.0 and [t.token for t in entry.top_logprobs] == [entry.token]
        assert entry.top_logprobs[0].bytes == entry.bytes
    # The echo engine replays the chat template; special tokens are named, the text skips them.
    names = "".join(entry.token for entry in content)
    assert "日本語 ok 😀" in names and "<|im_start|>" in names
    assert "日本語 ok 😀" in choice.message.content


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_logprobs_and_max_tokens_zero_scores_the_prompt(
    client: Any, tokenizer: PreTrainedTokenizerBase, as_ids: bool
) -> None:
    ids = tokenizer.encode(PROMPT)
    # As lm-evaluation-harness sends it: the prompt as token ids (here once as text too).
    prompt: Any = [ids] if as_ids else PROMPT
    reply = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs.tokens == names_of(tokenizer, ids)
    assert logprobs.token_logprobs == [None] + [0.0] * (len(ids) - 1)  # nothing predicts the first token
    assert logprobs.top_logprobs[0] is None
    assert logprobs.top_logprobs[1:] == [{name: 0.0} for name in logprobs.tokens[1:]]
    assert_offsets_place_each_token(choice.text, logprobs.tokens, logprobs.text_offset)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)

    # Without logprobs: the prompt alone; with a few tokens: the output's offsets count the prompt.
    plain = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None
    more = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=3)
    more_logprobs = more.choices[0].logprobs
    assert more.choices[0].text == PROMPT + tokenizer.decode(ids[:3])
    assert more_logprobs.tokens == logprobs.tokens + names_of(tokenizer, ids)[:3]
    assert more_logprobs.text_offset[len(ids)] == len(PROMPT)
    assert_offsets_place_each_token(more.choices[0].text, more_logprobs.tokens, more_logprobs.text_offset)


def test_echo_scoring_streamed(client: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("one two three")
    chunks = list(
        client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=2, stream=True)
    )
    first = chunks[0].choices[0]
    assert first.text == "one two three" and first.logprobs.tokens == ["one", " two", " three"]
    assert first.logprobs.token_logprobs == [None, 0.0, 0.0] and first.logprobs.text_offset == [0, 3, 7]
    rest = [c.choices[0] for c in chunks[1:] if c.choices and c.choices[0].logprobs]
    assert [t for c in rest for t in c.logprobs.tokens] == ["one", " two"]
    assert [o for c in rest for o in c.logprobs.text_offset] == [13, 16]


def test_prompt_logprobs_in_vllm_shape(client: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("Hi there you")
    reply = client.completions.create(
        model=MODEL, prompt="Hi there you", max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    prompt_logprobs = reply.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None
    assert prompt_logprobs[1:] == [
        {str(token): {"logprob": 0.0, "rank": 1, "decoded_token": tokenizer.decode([token])}} for token in ids[1:]
    ]
    assert reply.choices[0].logprobs is None  # only what was asked for

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    chat_prompt_logprobs = chat.model_extra["prompt_logprobs"]  # on the response, for chat (vLLM)
    assert chat_prompt_logprobs[0] is None and len(chat_prompt_logprobs) == chat.usage.prompt_tokens
    assert all(entry is not None and len(entry) == 1 for entry in chat_prompt_logprobs[1:])


def test_tokens_as_ids_on_request(client: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("Hi there")
    reply = client.completions.create(
        model=MODEL, prompt="Hi there", max_tokens=2, logprobs=1, extra_body={"return_tokens_as_token_ids": True}
    )
    assert reply.choices[0].logprobs.tokens == [f"token_id:{t}" for t in ids]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(echo_pipeline: Pipeline, body: dict[str, Any], param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(f"{echo_pipeline.gateway_url}{path}", json={"model": MODEL, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
