"""EngineCore end to end on a fake runner whose logits depend on the KV it reads."""

from __future__ import annotations

import pytest
import torch

from services.engine.contract import EngineRequest
from services.engine.core.engine_core import EngineCore, EngineCoreConfig
from services.engine.model.batch import ForwardBatch
from shared.messages import SamplingParams
from tests.fakes.engine_core import (
    VOCAB,
    FakeRunner,
    assert_all_blocks_free,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    run,
    runner_of,
)


def test_greedy_batch_matches_reference_token_for_token() -> None:
    core = make_engine()
    prompts = random_prompts(24, 1, 40)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(12)))
    results = run(core)
    for i, prompt in enumerate(prompts):
        tokens, finish, _ = results[f"r{i}"]
        assert tokens == reference_greedy(prompt, 12)
        assert finish == "length"
    assert_all_blocks_free(core)


def test_chunked_prefill_splits_long_prompts_and_stays_correct() -> None:
    core = make_engine(max_num_batched_tokens=8, max_running_requests=4)
    prompts = random_prompts(6, 20, 50, seed=1)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(6)))
    results = run(core)
    runner = runner_of(core)
    assert all(sum(b.query_lens) <= 8 for b in runner.batches)
    assert any(max(b.query_lens) == 8 and len(b.query_lens) == 1 for b in runner.batches)
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"][0] == reference_greedy(prompt, 6)
    assert_all_blocks_free(core)


def test_prefix_cache_hits_skip_computation_and_give_the_same_tokens() -> None:
    core = make_engine(block_size=4)
    shared = random_prompts(1, 40, 40, seed=2)[0]
    core.add_request(EngineRequest("first", shared + [1, 2], greedy(5)))
    run(core)
    core.add_request(EngineRequest("second", shared + [3], greedy(5)))
    runner = runner_of(core)
    before = len(runner.batches)
    results = run(core)
    # The 40 shared tokens (10 full blocks) come from the cache: only 1 prompt token is computed.
    assert runner.batches[before].query_lens == [1]
    assert results["second"][0] == reference_greedy(shared + [3], 5)
    assert core.block_manager.prefix_hits > 0
    assert_all_blocks_free(core)


def test_identical_prompts_together_and_cached_prompt_of_exact_block_multiple() -> None:
    core = make_engine(block_size=4)
    prompt = random_prompts(1, 16, 16, seed=3)[0]  # exactly 4 blocks
    for i in range(3):
        core.add_request(EngineRequest(f"a{i}", prompt, greedy(6)))
    results = run(core)
    core.add_request(EngineRequest("again", prompt, greedy(6)))
    results.update(run(core))
    expected = reference_greedy(prompt, 6)
    assert all(results[key][0] == expected for key in ("a0", "a1", "a2", "again"))
    assert_all_blocks_free(core)


def test_tiny_pool_preempts_and_every_request_still_gets_the_right_output() -> None:
    # 24 blocks of 4 tokens: far less than 12 requests of ~30 tokens need at once.
    core = make_engine(num_blocks=24, block_size=4, max_num_batched_tokens=32, max_running_requests=12)
    prompts = random_prompts(12, 10, 30, seed=4)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(20)))
    results = run(core)
    assert core.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"][0] == reference_greedy(prompt, 20), f"r{i}"
    assert_all_blocks_free(core)


def test_tiny_pool_without_prefix_cache_also_recomputes_correctly() -> None:
    core = make_engine(num_blocks=20, block_size=4, max_running_requests=8, enable_prefix_caching=False)
    prompts = random_prompts(8, 8, 24, seed=5)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(24)))
    results = run(core)
    assert core.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"][0] == reference_greedy(prompt, 24)
    assert_all_blocks_free(core)


def test_abort_leaves_the_batch_and_frees_blocks_within_one_step() -> None:
    core = make_engine()
    prompts = random_prompts(4, 10, 20, seed=6)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(50)))
    core.step()
    core.step()
    used_before = core.block_manager.num_blocks - core.block_manager.num_free_blocks
    core.abort(["r1", "unknown"])
    outputs = core.step()
    aborted = [o for o in outputs if o.request_id == "r1"]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].new_token_ids == []
    assert core.block_manager.num_blocks - core.block_manager.num_free_blocks < used_before
    runner = runner_of(core)
    assert len(runner.batches[-1].query_lens) == 3
    core.abort(["r0", "r2", "r3"])
    outputs = core.step()
    assert sorted(o.request_id for o in outputs) == ["r0", "r2", "r3"]
    assert not core.has_unfinished()
    assert_all_blocks_free(core)


def test_abort_of_a_waiting_request_is_reported_once() -> None:
    core = make_engine()
    core.add_request(EngineRequest("w", [1, 2, 3], greedy(5)))
    core.abort(["w"])
    assert core.has_unfinished()
    assert [(o.request_id, o.finish_reason) for o in core.step()] == [("w", "abort")]
    assert core.step() == []
    assert not core.has_unfinished()


def test_stop_eos_min_tokens_and_ignore_eos() -> None:
    prompt = [4, 5, 6]
    expected = reference_greedy(prompt, 10)
    stop_at = expected[3]
    first = expected.index(stop_at)
    core = make_engine()
    core.add_request(EngineRequest("stop", prompt, greedy(10, stop_token_ids=[stop_at])))
    core.add_request(EngineRequest("eos", prompt, greedy(10, eos_token_ids=[stop_at])))
    core.add_request(EngineRequest("ignore", prompt, greedy(10, eos_token_ids=[stop_at], ignore_eos=True)))
    results = run(core)
    assert results["stop"][0] == expected[: first + 1] and results["stop"][1] == "stop"
    assert results["eos"][0] == expected[: first + 1] and results["eos"][1] == "stop"
    assert results["ignore"][0] == expected and results["ignore"][1] == "length"

    # min_tokens masks the stop token: the first token can never be it.
    first_token = expected[0]
    core.add_request(EngineRequest("min", prompt, greedy(3, stop_token_ids=[first_token], min_tokens=2)))
    core.add_request(EngineRequest("nomin", prompt, greedy(3, stop_token_ids=[first_token])))
    results = run(core)
    assert results["nomin"][0] == [first_token] and results["nomin"][1] == "stop"
    assert results["min"][0][0] != first_token and len(results["min"][0]) >= 2


def test_default_eos_applies_when_the_request_has_none() -> None:
    prompt = [7, 8, 9]
    expected = reference_greedy(prompt, 10)
    core = make_engine(default_eos=[expected[1]])
    core.add_request(EngineRequest("r", prompt, greedy(10)))
    tokens, finish, _ = run(core)["r"]
    assert tokens == expected[: expected.index(expected[1]) + 1] and finish == "stop"


def test_context_length_limit_finishes_with_length() -> None:
    core = make_engine(max_model_len=20)
    core.add_request(EngineRequest("r", list(range(15)), greedy(100)))
    tokens, finish, _ = run(core)["r"]
    assert len(tokens) == 5 and finish == "length"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "empty"),
        (list(range(30)), "context length of 20"),
        ([1, 2, VOCAB], "outside this model's vocabulary"),
        ([-1], "outside this model's vocabulary"),
    ],
)
def test_bad_prompts_finish_with_a_clear_error(prompt: list[int], message: str) -> None:
    core = make_engine(max_model_len=20)
    core.add_request(EngineRequest("bad", prompt, greedy(5)))
    core.add_request(EngineRequest("good", [1, 2, 3], greedy(2)))
    results = run(core)
    _, finish, outs = results["bad"]
    assert finish == "error" and message in (outs[-1].error or "")
    assert results["good"][1] == "length"


def test_prompt_larger_than_the_pool_is_refused_naming_the_kv_cache() -> None:
    core = make_engine(num_blocks=4, block_size=4, max_model_len=1000)
    core.add_request(EngineRequest("big", list(range(17)), greedy(5)))
    core.add_request(EngineRequest("fits", list(range(16)), greedy(5)))
    results = run(core)
    assert results["big"][1] == "error" and "KV cache holds at most 16 tokens" in (results["big"][2][-1].error or "")
    # A prompt that fills the pool exactly still gets its one token.
    assert results["fits"][0] == reference_greedy(list(range(16)), 1) and results["fits"][1] == "length"
    assert_all_blocks_free(core)


def test_duplicate_request_id_is_ignored() -> None:
    core = make_engine()
    core.add_request(EngineRequest("r", [1, 2, 3], greedy(4)))
    core.step()
    # A redelivery of a running request: the running copy answers, once.
    core.add_request(EngineRequest("r", [9, 9, 9], greedy(4)))
    results = run(core)
    assert results["r"][0] == reference_greedy([1, 2, 3], 4)[1:]


def test_an_aborted_request_id_can_be_added_anew() -> None:
    """Let go of (another engine took it over), then claimed back later: it runs again."""
    core = make_engine()
    core.add_request(EngineRequest("r", [1, 2, 3], greedy(4)))
    [first] = core.step()
    core.abort(["r"])
    assert [(o.request_id, o.finish_reason) for o in core.step()] == [("r", "abort")]
    core.add_request(EngineRequest("r", [1, 2, 3], greedy(4), output_token_ids=first.new_token_ids))
    assert run(core)["r"][0] == reference_greedy([1, 2, 3], 4)[1:]
    assert_all_blocks_free(core)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_full_batch() -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    prompt = [3, 1, 4, 1, 5]
    alone = make_engine()
    alone.add_request(EngineRequest("seeded", prompt, params))
    alone_tokens = run(alone)["seeded"][0]

    crowded = make_engine()
    for i, other in enumerate(random_prompts(15, 3, 30, seed=7)):
        crowded.add_request(EngineRequest(f"o{i}", other, SamplingParams(max_tokens=20, temperature=1.3)))
    crowded.add_request(EngineRequest("seeded", prompt, params))
    assert run(crowded)["seeded"][0] == alone_tokens
    # And a different seed gives a different sequence.
    other = make_engine()
    other.add_request(EngineRequest("seeded", prompt, params.model_copy(update={"seed": 99})))
    assert run(other)["seeded"][0] != alone_tokens


def test_logprobs_are_reported_per_token_when_asked() -> None:
    core = make_engine()
    core.add_request(EngineRequest("lp", [1, 2, 3], greedy(3, logprobs=2)))
    core.add_request(EngineRequest("plain", [1, 2, 3], greedy(3)))
    results = run(core)
    for out in results["lp"][2]:
        assert out.logprobs is not None and len(out.logprobs) == 1
        chosen, top = out.logprobs[0]
        assert len(top) == 2 and top[0][0] == out.new_token_ids[0] and top[0][1] == pytest.approx(chosen)
    assert all(out.logprobs is None for out in results["plain"][2])


def test_free_slots_follow_the_running_cap_and_kv_room() -> None:
    # A token budget large enough that pull pacing (next test) never binds here.
    core = make_engine(num_blocks=40, block_size=4, max_running_requests=4, max_num_batched_tokens=512)
    assert core.free_slots() == 4
    core.add_request(EngineRequest("a", [1] * 30, greedy(50)))
    assert core.free_slots() == 3
    core.step()
    # A 30-token prompt holds 8 of 40 blocks.
    assert core.free_slots() == 3
    core.add_request(EngineRequest("b", [2] * 100, greedy(5)))  # wants 25 more blocks
    assert core.free_slots() == 2
    core.add_request(EngineRequest("c", [3] * 30, greedy(5)))  # nothing left for a fourth
    assert core.free_slots() == 0
    load = core.load()
    assert (load.running, load.waiting) == (1, 2)
    assert load.kv_usage == pytest.approx(8 / 40)


def test_a_replica_pulls_only_what_its_next_two_steps_can_start() -> None:
    """Two steps of 64 tokens: with room for 16 requests it takes fewer, so a burst is
    shared with the other replicas (and a replica that dies holds fewer)."""
    core = make_engine(max_num_batched_tokens=64, max_running_requests=16, num_blocks=256)
    assert core.free_slots() == 1  # nothing seen yet: a request is taken to bring 128 tokens
    for i in range(40):  # 16-token requests, taken and finished: the mean request shrinks
        core.add_request(EngineRequest(f"warm{i}", [1] * 16, greedy(1)))
        run(core)
    assert core.free_slots() >= 5
    added = 0
    while core.free_slots():
        core.add_request(EngineRequest(f"r{added}", [2] * 16, greedy(4)))
        added += 1
    # Stopped at two steps' worth (128 tokens) queued, though 16 would fit the cap and the pool.
    assert 8 <= added <= 9
    core.step()  # the first 64 tokens start
    assert core.free_slots() >= 1


def test_forward_share_is_time_in_forward_over_wall_time() -> None:
    now = [0.0]

    class SlowRunner(FakeRunner):
        def forward(self, batch: ForwardBatch) -> torch.Tensor:
            now[0] += 0.3  # the forward pass takes 0.3 s of the fake clock
            return super().forward(batch)

    config = EngineCoreConfig(num_blocks=32, block_size=4, vocab_size=VOCAB, max_model_len=128, load_window_s=10.0)
    core = EngineCore(SlowRunner(32, 4), config, clock=lambda: now[0])
    core.add_request(EngineRequest("r", [1, 2], greedy(100)))
    for _ in range(10):
        core.step()
        now[0] += 0.2  # service overhead between steps
    assert core.load().forward_share == pytest.approx(0.6)
    now[0] += 20.0  # idle: the window holds no forward time any more
    assert core.load().forward_share == 0.0


def test_load_reports_kv_usage_prefix_cache_preemptions_and_queue_time() -> None:
    """The figures the heartbeat carries (vllm:kv_cache_usage_perc, prefix_cache_*, num_preemptions,
    request_queue_time_seconds), checked against what the steps did."""
    now = [0.0]
    config = EngineCoreConfig(num_blocks=20, block_size=4, vocab_size=VOCAB, max_model_len=80)
    core = EngineCore(FakeRunner(20, 4), config, clock=lambda: now[0])
    prompt = random_prompts(1, 16, 16, seed=8)[0]  # 4 full blocks
    core.add_request(EngineRequest("a", prompt, greedy(3)))
    now[0] = 0.5  # waited half a second before its first step
    run(core)
    load = core.load()
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (16, 0)
    assert load.kv_usage == 0.0  # its blocks stay cached, but nobody holds them
    core.add_request(EngineRequest("b", prompt + [7], greedy(3)))
    core.step()  # b starts from a's 4 cached blocks and takes a fifth
    load = core.load()
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (16 + 17, 16)
    assert (load.running, load.waiting) == (1, 0)
    assert load.kv_usage == pytest.approx(5 / 20)
    assert load.preemptions == 0
    run(core)
    waits = load.queue_time
    assert waits.count == 2 and waits.total == pytest.approx(0.5)
    assert waits.counts[1] == 1  # 0.5 s: the bucket bounded by 0.5 (REQUEST_LATENCY_BUCKETS)


def test_load_counts_each_preemption_and_each_request_queued_once() -> None:
    core = make_engine(num_blocks=24, block_size=4, max_num_batched_tokens=32, max_running_requests=12)
    prompts = random_prompts(12, 10, 30, seed=4)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", prompt, greedy(20)))
    run(core)
    load = core.load()
    assert load.preemptions == core.scheduler.num_preemptions > 0
    # A preempted request starts again, but waited in the queue once (as vLLM's queue time).
    assert load.queue_time.count == 12
