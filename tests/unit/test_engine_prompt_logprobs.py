"""Prompt logprobs and prefill-only requests (max_tokens 0) in EngineCore, on the fake runner.

The fake runner's logits at a position depend on the whole context it reads back from its KV
"pool", so a prompt logprob computed from skipped, stale or foreign positions differs from the
reference computed straight from the prompt.
"""

from __future__ import annotations

import math

import torch

from services.engine.contract import EngineRequest
from services.engine.core.sampler import Sampler
from shared.messages import PromptTokenLogprobs, SamplingParams
from tests.fakes.engine_core import (
    VOCAB,
    assert_all_blocks_free,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    reference_logits,
    run,
    runner_of,
)


def reference_prompt_logprobs(prompt: list[int], top: int) -> list[PromptTokenLogprobs | None]:
    expected: list[PromptTokenLogprobs | None] = [None]
    for p in range(len(prompt) - 1):
        logprobs = torch.log_softmax(reference_logits(prompt[: p + 1]), dim=-1)
        token = prompt[p + 1]
        rank = int((logprobs > logprobs[token]).sum()) + 1
        values, ids = logprobs.topk(top)
        expected.append((float(logprobs[token]), rank, list(zip(ids.tolist(), values.tolist()))))
    return expected


def assert_close(got: list[PromptTokenLogprobs | None] | None, want: list[PromptTokenLogprobs | None]) -> None:
    assert got is not None and len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g is not None
        assert math.isclose(g[0], w[0], abs_tol=1e-5) and g[1] == w[1]
        assert [t for t, _ in g[2]] == [t for t, _ in w[2]]
        assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), (_, b) in zip(g[2], w[2]))


def test_prompt_logprobs_come_with_the_first_token_over_chunked_prefill() -> None:
    core = make_engine(max_num_batched_tokens=8, max_running_requests=4)
    prompts = random_prompts(5, 10, 30, seed=11)
    for i, prompt in enumerate(prompts):
        sampling = greedy(4, prompt_logprobs=3) if i % 2 == 0 else greedy(4)
        core.add_request(EngineRequest(f"r{i}", prompt, sampling))
    results = run(core)
    for i, prompt in enumerate(prompts):
        tokens, finish, outputs = results[f"r{i}"]
        assert tokens == reference_greedy(prompt, 4) and finish == "length"
        if i % 2 == 0:
            assert_close(outputs[0].prompt_logprobs, reference_prompt_logprobs(prompt, 3))
        assert all(out.prompt_logprobs is None for out in outputs[1 if i % 2 == 0 else 0 :])
    # Prompt chunks were split over steps (8 tokens a step), and only asked-for positions cost rows.
    assert any(len(b.logits_indices) > len(b.query_lens) for b in runner_of(core).batches)
    assert_all_blocks_free(core)


def test_zero_alternatives_still_give_each_token_and_its_rank() -> None:
    core = make_engine()
    prompt = random_prompts(1, 12, 12, seed=12)[0]
    core.add_request(EngineRequest("r", prompt, greedy(1, prompt_logprobs=0)))
    outputs = run(core)["r"][2]
    assert_close(outputs[0].prompt_logprobs, reference_prompt_logprobs(prompt, 0))


def test_prefix_cache_does_not_skip_positions_whose_logprobs_are_asked() -> None:
    core = make_engine(block_size=4)
    prompt = random_prompts(1, 21, 21, seed=13)[0]
    core.add_request(EngineRequest("warm", prompt, greedy(2)))
    run(core)  # the prompt's full blocks are now in the prefix cache
    runner = runner_of(core)
    before = len(runner.batches)
    core.add_request(EngineRequest("scored", prompt, greedy(2, prompt_logprobs=2)))
    outputs = run(core)["scored"][2]
    assert runner.batches[before].query_lens == [21]  # every position computed: no cache hit
    assert_close(outputs[0].prompt_logprobs, reference_prompt_logprobs(prompt, 2))
    # A request that does not ask still uses the cache (the scored one registered its blocks too).
    hits = core.block_manager.prefix_hits
    core.add_request(EngineRequest("plain", prompt, greedy(2)))
    run(core)
    assert core.block_manager.prefix_hits == hits + 20
    assert_all_blocks_free(core)


def test_preempted_mid_prefill_the_prompt_logprobs_are_still_complete_and_right() -> None:
    # 10 blocks of 4: two long prompts prefilling in chunks cannot both fit; the newer is preempted.
    core = make_engine(num_blocks=10, block_size=4, max_num_batched_tokens=8, max_running_requests=4)
    prompts = random_prompts(2, 18, 18, seed=14)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(6, prompt_logprobs=1)))
    results = run(core)
    assert core.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        tokens, _, outputs = results[f"r{i}"]
        assert tokens == reference_greedy(prompt, 6)
        assert_close(outputs[0].prompt_logprobs, reference_prompt_logprobs(prompt, 1))
    assert_all_blocks_free(core)


def test_max_tokens_zero_prefills_and_ends_without_a_token() -> None:
    core = make_engine(max_num_batched_tokens=8)
    prompt = random_prompts(1, 19, 19, seed=15)[0]
    core.add_request(EngineRequest("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1)))
    core.add_request(EngineRequest("other", prompt[:5], greedy(3)))
    results = run(core)
    tokens, finish, outputs = results["score"]
    assert tokens == [] and finish == "length" and len(outputs) == 1
    assert_close(outputs[0].prompt_logprobs, reference_prompt_logprobs(prompt, 1))
    assert results["other"][0] == reference_greedy(prompt[:5], 3)
    assert_all_blocks_free(core)


def test_max_tokens_zero_without_prompt_logprobs_ends_at_once_without_running() -> None:
    core = make_engine()
    core.add_request(EngineRequest("echo", [5, 6, 7], SamplingParams(max_tokens=0)))
    core.add_request(EngineRequest("one", [5], SamplingParams(max_tokens=0, prompt_logprobs=2)))
    outputs = {out.request_id: out for out in core.step()}
    assert outputs["echo"].new_token_ids == [] and outputs["echo"].finish_reason == "length"
    assert outputs["echo"].prompt_logprobs is None
    assert outputs["one"].prompt_logprobs == [None]  # a one-token prompt has nothing to predict
    assert runner_of(core).batches == [] and not core.has_unfinished()


def test_a_taken_over_request_does_not_compute_its_prompt_logprobs_again() -> None:
    core = make_engine()
    prompt = random_prompts(1, 9, 9, seed=16)[0]
    done = reference_greedy(prompt, 2)
    core.add_request(EngineRequest("r", prompt, greedy(4, prompt_logprobs=2), output_token_ids=done))
    tokens, _, outputs = run(core)["r"]
    assert tokens == reference_greedy(prompt, 4)[2:]
    assert all(out.prompt_logprobs is None for out in outputs)
    assert all(len(b.logits_indices) == len(b.query_lens) for b in runner_of(core).batches)


def test_sampler_prompt_logprobs_match_log_softmax_over_many_rows() -> None:
    sampler = Sampler(VOCAB, seed=0)
    logits = torch.randn(300, VOCAB + 7) * 4  # padded vocabulary; more rows than one chunk
    targets = torch.randint(0, VOCAB, (300,)).tolist()
    tops = [i % 4 for i in range(300)]
    got = sampler.prompt_logprobs(logits, targets, tops)
    expected = torch.log_softmax(logits[:, :VOCAB], dim=-1)
    for row, (value, rank, alternatives) in enumerate(got):
        assert math.isclose(value, float(expected[row, targets[row]]), abs_tol=1e-5)
        assert rank == int((expected[row] > expected[row, targets[row]]).sum()) + 1
        assert [t for t, _ in alternatives] == expected[row].topk(tops[row]).indices.tolist()
