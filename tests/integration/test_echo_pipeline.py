"""The four services as real processes over a real Redis, with the echo engine.

The echo backend answers with the prompt's tokens repeated, so the text every
request must get back is known exactly; the pipeline has 2 tokenizers and 2
detokenizers, so requests also cross replicas.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_logs_on_failure")]

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "hi"}]


def echo_text(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_tokens: int) -> str:
    """What the echo engine must produce: the prompt's tokens, cycled, up to max_tokens."""
    repeats = max_tokens // len(prompt_ids) + 1
    return tokenizer.decode((prompt_ids * repeats)[:max_tokens], skip_special_tokens=True)


def chat_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def test_models_lists_the_served_model(echo_pipeline: Pipeline) -> None:
    response = httpx.get(f"{echo_pipeline.gateway_url}/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


def test_completion(echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "Hello world, this is a test"
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 12},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ids = tokenizer(prompt)["input_ids"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == echo_text(tokenizer, ids, 12)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


def test_streamed_completion_ends_with_done(echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "Streaming ünïcödé text 🙂 works"
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 30, "stream": True},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echo_text(tokenizer, tokenizer(prompt)["input_ids"], 30)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 2  # streamed, not one blob


def test_chat_completion_stops_at_the_end_of_turn_token(
    echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase
) -> None:
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT, "max_tokens": 100},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ids = chat_ids(tokenizer)
    # The echo replays the chat prompt, which reaches <|im_end|> (the EOS) after the system turn.
    before_eos = ids[: ids.index(tokenizer.eos_token_id)]
    choice = body["choices"][0]
    assert body["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(before_eos, skip_special_tokens=True)}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_streamed_chat(echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase) -> None:
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": CHAT,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == echo_text(tokenizer, chat_ids(tokenizer), 5)
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_many_concurrent_requests_each_get_their_own_answer(
    echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = [f"Request number {i} asks about {'cats' if i % 2 else 'dogs'}" for i in range(24)]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        response = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": prompts[i], "max_tokens": 8 + i, "stream": i % 2 == 0},
        )
        assert response.status_code == 200, response.text
        if i % 2:
            return i, response.json()["choices"][0]["text"]
        chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
        return i, "".join(c["choices"][0]["text"] for c in chunks)

    async def all_at_once() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=echo_pipeline.gateway_url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

    for i, text in asyncio.run(all_at_once()):
        assert text == echo_text(tokenizer, tokenizer(prompts[i])["input_ids"], 8 + i), f"request {i}"


def test_stop_string_truncates_the_text(echo_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase) -> None:
    # The echo output is "one two three fourone two ...": the stop string spans two tokens.
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/completions",
        json={"model": MODEL, "prompt": "one two three four", "max_tokens": 40, "stop": ["fourone"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == "one two three "
    assert choice["finish_reason"] == "stop"


def test_a_prompt_longer_than_the_context_is_refused_with_400(echo_pipeline: Pipeline) -> None:
    response = httpx.post(
        f"{echo_pipeline.gateway_url}/v1/completions",
        json={"model": MODEL, "prompt": "word " * 9000, "max_tokens": 4},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_bad_requests_get_openai_style_errors(echo_pipeline: Pipeline) -> None:
    url = f"{echo_pipeline.gateway_url}/v1/chat/completions"
    not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    bad_temperature = httpx.post(url, json={"model": MODEL, "messages": CHAT, "temperature": -3})
    assert bad_temperature.status_code == 400
    assert bad_temperature.json()["error"]["param"] == "temperature"
    unknown_model = httpx.post(url, json={"model": "gpt-17", "messages": CHAT})
    assert unknown_model.status_code == 404
