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
from shared.settings import CommonSettings, EngineSettings
from tests.integration.harness import Pipeline
from tests.integration.harness import torch_pipeline as start_torch_pipeline
from tests.integration.test_metrics import total, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def torch_pipeline(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Pipeline]:
    with start_torch_pipeline(redis_url, Path(tmp_path_factory.mktemp("logs")), "torch") as started:
        yield started


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(CommonSettings(), weights=True), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_texts(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[str]:
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


def log_softmax_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the distribution of the token after ids[: p + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_greedy_logprobs_are_transformers_log_softmax(
    torch_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module
) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{torch_pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=120)
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    choice = reply.choices[0]
    prompt_ids = tokenizer.encode(prompt)
    generated = tokenizer.encode(choice.text)  # greedy English text: it re-encodes to the same ids
    assert tokenizer.decode(generated) == choice.text and len(generated) == 8
    expected = log_softmax_of(model, prompt_ids + generated)[len(prompt_ids) - 1 : -1]
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated]
    for i, token in enumerate(generated):
        assert abs(logprobs.token_logprobs[i] - float(expected[i, token])) < 1e-3
        assert int(expected[i].argmax()) == token  # greedy
        top = expected[i].topk(3)
        want = {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        assert logprobs.top_logprobs[i].keys() == want.keys()
        assert all(abs(logprobs.top_logprobs[i][k] - v) < 1e-3 for k, v in want.items())
    assert logprobs.text_offset == [len(tokenizer.decode(generated[:i])) for i in range(len(generated))]


def test_echo_scoring_gives_transformers_prompt_logprobs(
    torch_pipeline: Pipeline, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module
) -> None:
    """What lm-evaluation-harness sends to score a text: token ids, echo, logprobs 1, max_tokens 0."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{torch_pipeline.gateway_url}/v1", api_key="none", max_retries=0, timeout=120)
    ids = tokenizer.encode("Paris is the capital and largest city of France, with 2.1 million résidents.")
    reply = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(ids) and reply.usage.completion_tokens == 0
    expected = log_softmax_of(model, ids)
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert abs(logprobs.token_logprobs[position] - float(row[ids[position]])) < 1e-3
        best = int(row.argmax())
        top = logprobs.top_logprobs[position]
        assert tokenizer.decode([best]) in top and abs(top[tokenizer.decode([best])] - float(row[best])) < 1e-3
    # The same through vLLM's prompt_logprobs, with each prompt token's rank.
    vllm = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, extra_body={"prompt_logprobs": 0})
    prompt_logprobs = vllm.choices[0].model_extra["prompt_logprobs"]
    for position in range(1, len(ids)):
        row, token = expected[position - 1], ids[position]
        entry = prompt_logprobs[position][str(token)]
        assert abs(entry["logprob"] - float(row[token])) < 1e-3
        assert entry["rank"] == int((row > row[token]).sum()) + 1


def test_n_choices_compute_their_prompt_once_and_answer_as_one(torch_pipeline: Pipeline) -> None:
    """n=3 greedy: the engine computes the prompt for one choice and the others take its KV
    blocks (the prefix-cache hits rise by two copies of it), and every choice is the answer a
    single request gets."""
    block_size = EngineSettings().block_size
    prompt = "Write a list of every planet in the solar system, with one fact about each: " * 4
    num_prompt_tokens = len(
        httpx.post(f"{torch_pipeline.gateway_url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    )
    shared = (num_prompt_tokens - 1) // block_size * block_size  # the last token's block is computed by each
    # The engine says which compute paths it runs (issue 8): the dtype it was started with.
    before = wait_for(
        torch_pipeline,
        lambda found: any(name == "scalellm:engine_kernels" for name, _ in found),
        "the engine's heartbeat names its kernels",
    )
    kernels = [dict(labels)["kernels"] for name, labels in before if name == "scalellm:engine_kernels"]
    assert len(kernels) == 1 and "dtype float32" in kernels[0] and "CPU flags" in kernels[0], kernels
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "n": 3}
    three = httpx.post(f"{torch_pipeline.gateway_url}/v1/completions", json=body, timeout=120)
    assert three.status_code == 200, three.text
    hits_before = total(before, "vllm:prefix_cache_hits_total")
    wait_for(
        torch_pipeline,
        lambda found: total(found, "vllm:prefix_cache_hits_total") >= hits_before + 2 * shared,
        f"the prefix-cache hits rise by {2 * shared} (two choices reusing the first's prompt)",
    )
    one = httpx.post(f"{torch_pipeline.gateway_url}/v1/completions", json={**body, "n": 1}, timeout=120)
    assert [c["text"] for c in three.json()["choices"]] == [one.json()["choices"][0]["text"]] * 3
