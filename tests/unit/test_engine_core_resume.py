"""Resuming a request on another engine from the output tokens already generated (engine takeover).

A request resumed with its first k output tokens must produce exactly the
remaining tokens of the uninterrupted run: greedy and seeded random, with
penalties, min_tokens and stop tokens straddling the cut. The fake runner's
logits depend on the whole context it reads back from the KV blocks, so a
resumed sequence whose prefix was not prefilled as prompt + output, or whose
penalties or counters ignore the resumed tokens, comes out different.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.engine.contract import EngineRequest
from services.engine.core.engine_core import EngineCore
from services.engine.core.sampler import seeded_uniform
from shared.messages import SamplingParams
from tests.fakes.engine_core import assert_all_blocks_free, make_engine, random_prompts, reference_logits, run

PROMPT = [11, 42, 7, 99, 3, 58, 21]
MAX_TOKENS = 40


def crowd(core: EngineCore, count: int = 6) -> None:
    """Other requests sharing the batches (unseeded random: they use the engine's generator)."""
    for i, prompt in enumerate(random_prompts(count, 5, 30, seed=11)):
        core.add_request(EngineRequest(f"other{i}", prompt, SamplingParams(max_tokens=25, temperature=1.2)))


def uninterrupted(params: SamplingParams, **engine: Any) -> tuple[list[int], str | None]:
    core = make_engine(**engine)
    crowd(core)
    core.add_request(EngineRequest("r", PROMPT, params))
    tokens, finish, _ = run(core)["r"]
    return tokens, finish


def resumed(params: SamplingParams, done: list[int], **engine: Any) -> tuple[list[int], str | None]:
    """On a fresh engine (another replica), from the first ``len(done)`` output tokens."""
    core = make_engine(**engine)
    crowd(core, 3)
    core.add_request(EngineRequest("r", PROMPT, params, output_token_ids=list(done)))
    tokens, finish, _ = run(core)["r"]
    assert_all_blocks_free(core)
    return tokens, finish


SAMPLINGS = {
    "greedy-penalties": SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3
    ),
    "seeded": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1234),
    "seeded-truncated-penalties": SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        top_k=30,
        top_p=0.9,
        min_p=0.02,
        seed=-77,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    ),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_a_resumed_request_continues_exactly_as_the_uninterrupted_run(name: str) -> None:
    params = SAMPLINGS[name]
    full, finish = uninterrupted(params)
    assert finish == "length" and len(full) == MAX_TOKENS
    for cut in (1, 2, 9, 16, 27, MAX_TOKENS - 1):
        # A small budget: prompt + output are prefilled in chunks, as a preempted sequence is.
        assert resumed(params, full[:cut], max_num_batched_tokens=8) == (full[cut:], "length"), cut


@pytest.mark.parametrize("name", ["greedy-penalties", "seeded"])
def test_stop_token_and_min_tokens_across_the_cut(name: str) -> None:
    base = SAMPLINGS[name].model_copy(update={"ignore_eos": False})
    free_run, _ = uninterrupted(base)
    # A stop token that occurs late in the free run, masked by min_tokens until after the cut.
    stop = free_run[20]
    params = base.model_copy(update={"stop_token_ids": [stop], "min_tokens": 12})
    full, finish = uninterrupted(params)
    assert finish == "stop" and full[-1] == stop and len(full) >= 12
    for cut in (3, 11, 12, len(full) - 1):
        assert resumed(params, full[:cut]) == (full[cut:], "stop"), cut


def test_resumed_in_a_tiny_pool_with_preemption_is_still_exact() -> None:
    params = SAMPLINGS["seeded-truncated-penalties"]
    full, _ = uninterrupted(params)
    tokens, finish = resumed(params, full[:20], num_blocks=24, block_size=4)
    assert (tokens, finish) == (full[20:], "length")


def test_unseeded_random_continues_from_the_resumed_tokens() -> None:
    """No seed: the continuation cannot be the same, but it is drawn from the model's
    distribution given prompt + the resumed output (seen through its raw logprobs)."""
    done = [5, 17, 17, 80]
    core = make_engine()
    params = SamplingParams(max_tokens=6, temperature=1.0, logprobs=0)
    core.add_request(EngineRequest("r", PROMPT, params, output_token_ids=done))
    tokens, finish, outputs = run(core)["r"]
    assert finish == "length" and len(tokens) == 2  # max_tokens counts the resumed ones
    context = PROMPT + done
    for output in outputs:
        [token] = output.new_token_ids
        assert output.logprobs is not None
        expected = torch.log_softmax(reference_logits(context), dim=-1)[token].item()
        assert output.logprobs[0][0] == pytest.approx(expected, abs=1e-5)
        context.append(token)


def test_a_request_resumed_after_its_end_finishes_at_once_with_no_tokens() -> None:
    core = make_engine(max_model_len=20)
    core.add_request(EngineRequest("maxed", PROMPT, SamplingParams(max_tokens=3), output_token_ids=[1, 2, 3]))
    core.add_request(
        EngineRequest("stopped", PROMPT, SamplingParams(max_tokens=9, stop_token_ids=[4]), output_token_ids=[1, 4])
    )
    core.add_request(EngineRequest("context", PROMPT, SamplingParams(max_tokens=99), output_token_ids=[1] * 13))
    core.add_request(EngineRequest("bad", PROMPT, SamplingParams(max_tokens=9), output_token_ids=[1, 10_000]))
    results = run(core)
    assert {rid: (tokens, finish) for rid, (tokens, finish, _) in results.items() if rid != "bad"} == {
        "maxed": ([], "length"),
        "stopped": ([], "stop"),
        "context": ([], "length"),
    }
    assert results["bad"][1] == "error" and "outside this model's vocabulary" in (results["bad"][2][-1].error or "")
    assert_all_blocks_free(core)


def test_seeded_draws_depend_only_on_seed_and_position() -> None:
    draws = [seeded_uniform(42, position) for position in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert draws == [seeded_uniform(42, position) for position in range(2000)]
    assert draws != [seeded_uniform(43, position) for position in range(2000)]
    assert seeded_uniform(-1, 0) == seeded_uniform((1 << 64) - 1, 0)  # seeds are taken mod 2**64
    # Roughly uniform: each tenth of [0, 1) gets about a tenth of the draws.
    deciles = [sum(int(u * 10) == d for u in draws) for d in range(10)]
    assert min(deciles) > 140 and max(deciles) < 260


def test_a_taken_over_request_starts_before_fresh_requests_that_queued_earlier() -> None:
    # Room for one prefill per step: whoever goes first streams first.
    core = make_engine(max_num_batched_tokens=len(PROMPT) + 2)
    for i in range(3):
        core.add_request(EngineRequest(f"fresh{i}", PROMPT, SamplingParams(max_tokens=4, temperature=0.0)))
    core.add_request(
        EngineRequest("taken", PROMPT, SamplingParams(max_tokens=4, temperature=0.0), output_token_ids=[5])
    )
    first = [o.request_id for o in core.step() if o.new_token_ids]
    assert first == ["taken"]
