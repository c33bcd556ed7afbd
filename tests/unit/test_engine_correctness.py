"""The torch engine against transformers' generate, token for token, in float32.

One transformers reference (HFBackend, i.e. ``model.generate``) is computed per
module for 20 varied prompts x 32 greedy tokens; the engine then serves the
same prompts alone, inside a batch of 64 mixed-length requests, with chunked
prefill splitting the prompts, from the prefix cache, and from a KV pool far
too small for its load (preemption). Every output must match exactly, and
every KV block must be free at the end.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.engine.contract import EngineRequest
from services.engine.core.build import engine_core_for
from services.engine.core.engine_core import EngineCore
from services.engine.model.runner import ModelRunner
from shared.messages import SamplingParams
from shared.settings import EngineSettings

# About 2-3 minutes on an idle 2-core machine (the transformers reference is a
# third of it); the timeout leaves room for a machine shared with other work.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NEW_TOKENS = 32
BLOCK_SIZE = 16
POOL_BLOCKS = 640

_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4, 5,",
    "Translate to French: I would like a cup of coffee, please.",
    "import numpy as np\nimport torch\n\nclass LinearRegression:\n    def __init__(self",
    "Q: What is the boiling point of water at sea level?\nA:",
    "東京は日本の首都です。大阪は",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "SELECT name, age FROM users WHERE",
    "Roses are red,\nViolets are blue,\n",
    "In 1969, Apollo 11",
    "<html>\n  <head>\n    <title>",
    "Dear Sir or Madam,\n\nI am writing to inform you that",
    "🙂🙃 emoji and symbols: ∑ ∫ √ ∞ →",
    "The mitochondria is",
]
_CHATS = [
    "What is the largest planet in the solar system?",
    "Write a haiku about the sea.",
    "Explain recursion to a five-year-old in two sentences.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from shared.model_files import ModelResolutionError, resolve_model_dir

    try:
        return resolve_model_dir(EngineSettings(), weights=True)
    except ModelResolutionError as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = [tokenizer(text)["input_ids"] for text in _TEXTS]
    for question in _CHATS:
        # Chat prompts share the template's system preamble: natural prefix-cache hits.
        messages = [{"role": "user", "content": question}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        result.append(list(encoded["input_ids"]))
    result.append([tokenizer.convert_tokens_to_ids("Hello")])  # a one-token prompt
    assert len(result) == 20
    assert len({len(p) for p in result}) > 12  # varied lengths, some over three blocks
    assert max(len(p) for p in result) > 3 * BLOCK_SIZE
    return result


def greedy() -> SamplingParams:
    # ignore_eos: every prompt yields all 32 tokens, so all of them are compared.
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from services.engine.hf_backend import HFBackend

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    hf = HFBackend(model, vocab_size=model.config.vocab_size, max_model_len=2048, default_eos_token_ids=[])
    outputs = []
    for i, prompt in enumerate(prompts):
        out = hf.generate(EngineRequest(f"ref{i}", prompt, greedy()))
        assert len(out.new_token_ids) == NEW_TOKENS
        outputs.append(out.new_token_ids)
    return outputs


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    # One runner (weights + pool) for every engine below; each EngineCore's own
    # block manager decides which of the pool's blocks it uses.
    return ModelRunner(
        model_dir,
        dtype="float32",
        device="cpu",
        block_size=BLOCK_SIZE,
        num_blocks=POOL_BLOCKS,
        kv_cache_bytes=None,
        max_model_len=None,
    )


def make_core(
    runner: ModelRunner, *, budget: int = 512, max_running: int = 64, prefix: bool = True, num_blocks: int | None = None
) -> EngineCore:
    return engine_core_for(
        runner,
        max_num_batched_tokens=budget,
        max_running_requests=max_running,
        enable_prefix_caching=prefix,
        num_blocks=num_blocks,
    )


def run(core: EngineCore, requests: list[EngineRequest]) -> dict[str, list[int]]:
    for request in requests:
        core.add_request(request)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    for _ in range(100_000):
        if not core.has_unfinished():
            break
        for out in core.step():
            assert out.finish_reason != "error", out.error
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished.add(out.request_id)
    assert finished == set(tokens)
    bm = core.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
    return tokens


def requests_for(prompts: list[list[int]], tag: str) -> list[EngineRequest]:
    return [EngineRequest(f"{tag}{i}", prompt, greedy()) for i, prompt in enumerate(prompts)]


def assert_matches(tokens: dict[str, list[int]], reference: list[list[int]], tag: str, count: int = 20) -> None:
    mismatched = [i for i in range(count) if tokens[f"{tag}{i}"] != reference[i % 20]]
    assert not mismatched, f"differs from transformers for prompts {mismatched}"


def test_each_prompt_alone(runner: ModelRunner, prompts: list[list[int]], reference: list[list[int]]) -> None:
    core = make_core(runner, prefix=False)
    for i, request in enumerate(requests_for(prompts, "alone")):
        tokens = run(core, [request])
        assert tokens[request.request_id] == reference[i], f"prompt {i}"


def test_inside_a_batch_of_64_mixed_length_requests(
    runner: ModelRunner, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    core = make_core(runner, prefix=False)
    # Every prompt three times (plus four), shuffled: 64 running together, all checkable.
    order = list(range(20)) * 3 + [0, 5, 10, 15]
    random.Random(0).shuffle(order)
    requests = [EngineRequest(f"b{n}", prompts[i], greedy()) for n, i in enumerate(order)]
    steps_before = core.num_steps
    tokens = run(core, requests)
    # All 64 ran together: 2 steps of prefill at most (the budget), then one per token.
    assert core.num_steps - steps_before <= NEW_TOKENS + 3
    mismatched = [n for n, i in enumerate(order) if tokens[f"b{n}"] != reference[i]]
    assert not mismatched, f"requests {mismatched} differ from transformers"


def test_chunked_prefill_then_served_from_the_prefix_cache(
    runner: ModelRunner, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # 24 tokens per step: every prompt over that is split, and decodes share the budget.
    core = make_core(runner, budget=24, max_running=24)
    tokens = run(core, requests_for(prompts, "chunk"))
    assert_matches(tokens, reference, "chunk")

    queries_before = core.block_manager.prefix_queries
    hits_before = core.block_manager.prefix_hits
    tokens = run(core, requests_for(prompts, "cached"))
    assert_matches(tokens, reference, "cached")
    queried = core.block_manager.prefix_queries - queries_before
    hit = core.block_manager.prefix_hits - hits_before
    # Every full block of every prompt (but a last token's) came from the cache.
    expected_hits = sum((len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in prompts)
    assert hit == expected_hits and hit > queried // 2


def test_tiny_kv_pool_preempts_and_still_matches(
    runner: ModelRunner, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # 64 requests that end up needing some 250 blocks, in a pool of 96 (1536 tokens).
    core = make_core(runner, prefix=False, num_blocks=96)
    order = list(range(20)) * 3 + [1, 2, 3, 4]
    requests = [EngineRequest(f"t{n}", prompts[i], greedy()) for n, i in enumerate(order)]
    tokens = run(core, requests)
    assert core.scheduler.num_preemptions > 0
    mismatched = [n for n, i in enumerate(order) if tokens[f"t{n}"] != reference[i]]
    assert not mismatched, f"requests {mismatched} differ from transformers"
