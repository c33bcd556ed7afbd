"""The real engine behind the whole pipeline: what a user gets is what transformers computes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from shared.model_files import resolve_model_dir
from shared.settings import CommonSettings
from tests.integration.harness import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def torch_pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    resolve_model_dir(CommonSettings(), weights=True)  # convert once, before the engine starts
    pipeline = Pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), env={"SCALELLM_STREAM_PREFIX": "torch"})
    try:
        pipeline.start("tokenizer")
        pipeline.start("engine", engine_backend="torch", dtype="float32", kv_cache_bytes=str(256 * 1024**2))
        pipeline.start("detokenizer")
        pipeline.start_gateway()
        pipeline.wait_ready(timeout=300)
        yield pipeline
    finally:
        pipeline.stop_all()


@pytest.fixture(scope="module")
def reference_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(CommonSettings(), weights=True), dtype=torch.float32)
    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_greedy_completions_equal_transformers_generate(torch_pipeline: Pipeline, reference_texts: list[str]) -> None:
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=torch_pipeline.gateway_url, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": prompt,
                            "max_tokens": NEW_TOKENS,
                            "temperature": 0,
                            "stream": i == 0,
                        },
                    )
                    for i, prompt in enumerate(PROMPTS)
                )
            )

    responses = asyncio.run(send_all())
    texts = []
    for response in responses:
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            texts.append("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]))
        else:
            texts.append(response.json()["choices"][0]["text"])
    assert texts == reference_texts


def test_chat_answers_and_stops_at_end_of_turn(torch_pipeline: Pipeline) -> None:
    response = httpx.post(
        f"{torch_pipeline.gateway_url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 64,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"


def test_the_same_seed_gives_the_same_sample(torch_pipeline: Pipeline) -> None:
    body = {"model": MODEL, "prompt": "My favourite colour is", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    first, second = (
        httpx.post(f"{torch_pipeline.gateway_url}/v1/completions", json=body, timeout=120) for _ in range(2)
    )
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
