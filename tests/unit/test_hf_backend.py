"""The transformers reference backend on a tiny random Llama (no download, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.contract import EngineRequest, RequestOutput
from services.engine.hf_backend import HFBackend, _PresenceFrequencyPenalty
from shared.messages import SamplingParams

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large weights give peaked logits: no near-ties for greedy to trip on.
        initializer_range=0.5,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def backend(model: torch.nn.Module, max_model_len: int = 256, eos: list[int] | None = None) -> HFBackend:
    return HFBackend(model, vocab_size=VOCAB, max_model_len=max_model_len, default_eos_token_ids=eos or [])


def manual_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def drain(hf: HFBackend) -> dict[str, RequestOutput]:
    results: dict[str, RequestOutput] = {}
    while hf.has_unfinished():
        for out in hf.step():
            results[out.request_id] = out
    return results


def test_greedy_matches_a_plain_argmax_loop(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    out = hf.generate(EngineRequest("r", [5, 6, 7, 8], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    assert out.new_token_ids == manual_greedy(tiny_model, [5, 6, 7, 8], 12)
    assert out.finish_reason == "length"


def test_a_taken_over_request_continues_after_its_output(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    params = SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5
    )
    hf.add_request(EngineRequest("full", [3, 4, 5], params))
    full = drain(hf)["full"].new_token_ids
    hf.add_request(EngineRequest("resumed", [3, 4, 5], params, output_token_ids=full[:4]))
    hf.add_request(EngineRequest("over", [3, 4, 5], params, output_token_ids=full))
    results = drain(hf)
    assert (results["resumed"].new_token_ids, results["resumed"].finish_reason) == (full[4:], "length")
    assert (results["over"].new_token_ids, results["over"].finish_reason) == ([], "length")


def test_stop_and_eos_end_the_request_unless_ignored(tiny_model: torch.nn.Module) -> None:
    prompt = [9, 10, 11]
    expected = manual_greedy(tiny_model, prompt, 10)
    stop = expected[2]
    cut = expected[: expected.index(stop) + 1]
    hf = backend(tiny_model, eos=[stop])
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    assert hf.generate(EngineRequest("a", prompt, greedy)).new_token_ids == cut  # the model's default EOS
    out = hf.generate(
        EngineRequest("b", prompt, greedy.model_copy(update={"eos_token_ids": [77], "stop_token_ids": [stop]}))
    )
    assert out.new_token_ids == cut and out.finish_reason == "stop"
    out = hf.generate(EngineRequest("c", prompt, greedy.model_copy(update={"ignore_eos": True})))
    assert out.new_token_ids == expected and out.finish_reason == "length"


def test_min_tokens_holds_back_eos(tiny_model: torch.nn.Module) -> None:
    prompt = [3, 4]
    first = manual_greedy(tiny_model, prompt, 1)[0]
    hf = backend(tiny_model)
    params = SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[first], min_tokens=3)
    out = hf.generate(EngineRequest("m", prompt, params))
    assert first not in out.new_token_ids[:3] and len(out.new_token_ids) >= 3


def test_context_limit_and_refusals(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model, max_model_len=14)
    hf.add_request(
        EngineRequest("fits", list(range(3, 13)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    )
    hf.add_request(EngineRequest("long", list(range(3, 18)), SamplingParams(max_tokens=5)))
    hf.add_request(EngineRequest("empty", [], SamplingParams()))
    hf.add_request(EngineRequest("vocab", [1, VOCAB], SamplingParams()))
    results = drain(hf)
    assert len(results["fits"].new_token_ids) == 4 and results["fits"].finish_reason == "length"
    assert results["long"].finish_reason == "error" and "context length of 14" in (results["long"].error or "")
    assert "empty" in (results["empty"].error or "")
    assert "outside this model's vocabulary" in (results["vocab"].error or "")


def test_one_request_at_a_time_abort_and_free_slots(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    assert hf.free_slots() == 1
    hf.add_request(EngineRequest("a", [5], SamplingParams(max_tokens=3, temperature=0.0)))
    hf.add_request(EngineRequest("b", [6], SamplingParams(max_tokens=3, temperature=0.0)))
    assert hf.free_slots() == 0 and hf.load().waiting == 2
    first = hf.step()
    assert [o.request_id for o in first] == ["a"]
    hf.abort(["b", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in hf.step()] == [("b", "abort")]
    assert not hf.has_unfinished() and hf.free_slots() == 1


def test_duplicate_request_id_is_ignored(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    hf.add_request(EngineRequest("r", [5, 6], params))
    # A redelivery of a queued request: the queued copy answers, once.
    hf.add_request(EngineRequest("r", [9, 9, 9], params))
    assert hf.load().waiting == 1
    [out] = hf.step()
    assert (out.request_id, out.new_token_ids) == ("r", manual_greedy(tiny_model, [5, 6], 4))
    assert not hf.has_unfinished()


def test_an_aborted_request_id_can_be_added_anew(tiny_model: torch.nn.Module) -> None:
    """Let go of (another engine took it over), then claimed back later: it runs again."""
    hf = backend(tiny_model)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    hf.add_request(EngineRequest("r", [5, 6], params))
    hf.abort(["r"])
    assert hf.step() == [RequestOutput("r", [], "abort")]
    hf.add_request(EngineRequest("r", [5, 6], params))
    assert [o.new_token_ids for o in hf.step()] == [manual_greedy(tiny_model, [5, 6], 4)]


def test_seeded_sampling_repeats_and_logprobs_are_reported(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=11, ignore_eos=True, logprobs=3)
    a = hf.generate(EngineRequest("a", [7, 8], params))
    b = hf.generate(EngineRequest("b", [7, 8], params))
    assert a.new_token_ids == b.new_token_ids
    assert a.logprobs is not None and len(a.logprobs) == 8
    chosen, top = a.logprobs[0]
    assert chosen <= 0.0 and len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_presence_and_frequency_processor_counts_output_only() -> None:
    processor = _PresenceFrequencyPenalty(prompt_len=2, presence=0.5, frequency=0.25)
    scores = processor(torch.tensor([[4, 4, 1, 2, 2]]), torch.zeros(1, 5))
    assert scores.tolist() == [[0.0, -0.75, -1.0, 0.0, 0.0]]


def test_engine_core_matches_hf_on_a_tiny_llama_with_penalties(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    """The torch engine against this reference on options beyond plain greedy."""
    runner_mod = pytest.importorskip("services.engine.model.runner")
    from services.engine.core.build import engine_core_for

    tiny_model.save_pretrained(tmp_path)
    runner = runner_mod.ModelRunner(
        tmp_path, dtype="float32", device="cpu", block_size=4, num_blocks=64, kv_cache_bytes=None, max_model_len=None
    )
    core = engine_core_for(runner, max_num_batched_tokens=16, max_running_requests=8, enable_prefix_caching=True)
    hf = backend(tiny_model, eos=[2])
    cases = {
        "plain": SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        "repetition": SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.8, ignore_eos=True),
        "presence": SamplingParams(
            max_tokens=16, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, ignore_eos=True
        ),
        "min_tokens": SamplingParams(max_tokens=16, temperature=0.0, min_tokens=6),
    }
    prompts = {"plain": [5, 17, 33, 2, 40, 41, 42], "repetition": [8] * 9, "presence": [60, 61], "min_tokens": [8] * 9}
    expected = {name: hf.generate(EngineRequest(name, prompts[name], params)) for name, params in cases.items()}
    for name, params in cases.items():
        core.add_request(EngineRequest(name, prompts[name], params))
    got: dict[str, list[int]] = {name: [] for name in cases}
    finish: dict[str, str | None] = {}
    while core.has_unfinished():
        for out in core.step():
            got[out.request_id].extend(out.new_token_ids)
            finish[out.request_id] = out.finish_reason
    # The options took effect: plain greedy on [8] * 9 gives 2 (EOS), 2, 3, ...
    assert got["min_tokens"][0] != 2 and got["repetition"][:3] != [2, 2, 3]
    for name in cases:
        assert got[name] == expected[name].new_token_ids, name
        assert finish[name] == expected[name].finish_reason, name


def test_prompt_logprobs_and_prefill_only(tiny_model: torch.nn.Module) -> None:
    hf = backend(tiny_model)
    prompt = [5, 17, 33, 40, 41]
    with torch.inference_mode():
        expected = torch.log_softmax(tiny_model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    scored = hf.generate(EngineRequest("s", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2)))
    assert scored.new_token_ids == [] and scored.finish_reason == "length"
    assert scored.prompt_logprobs is not None and scored.prompt_logprobs[0] is None
    for position, entry in enumerate(scored.prompt_logprobs[1:]):
        assert entry is not None
        value, rank, alternatives = entry
        row, token = expected[position], prompt[position + 1]
        assert abs(value - float(row[token])) < 1e-5 and rank == int((row > row[token]).sum()) + 1
        assert [t for t, _ in alternatives] == row.topk(2).indices.tolist()
    generated = hf.generate(
        EngineRequest("g", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    )
    assert generated.prompt_logprobs == scored.prompt_logprobs and len(generated.new_token_ids) == 3
    resumed = hf.generate(
        EngineRequest("r", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2), [7])
    )
    assert resumed.prompt_logprobs is None  # taken over: the first engine sent them


def test_engine_core_prompt_logprobs_match_hf(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    runner_mod = pytest.importorskip("services.engine.model.runner")
    from services.engine.core.build import engine_core_for

    tiny_model.save_pretrained(tmp_path)
    runner = runner_mod.ModelRunner(
        tmp_path, dtype="float32", device="cpu", block_size=4, num_blocks=64, kv_cache_bytes=None, max_model_len=None
    )
    # Chunked prefill (6 tokens a step) over a prompt already in the prefix cache.
    core = engine_core_for(runner, max_num_batched_tokens=6, max_running_requests=8, enable_prefix_caching=True)
    prompt = [5, 17, 33, 2, 40, 41, 42, 60, 61, 8, 8, 9, 10, 11]
    params = SamplingParams(max_tokens=0, prompt_logprobs=3)
    expected = backend(tiny_model).generate(EngineRequest("hf", prompt, params)).prompt_logprobs
    assert expected is not None
    for name in ("warm", "scored"):
        core.add_request(EngineRequest(name, prompt, params if name == "scored" else SamplingParams(max_tokens=1)))
        outputs = []
        while core.has_unfinished():
            outputs += core.step()
    got = outputs[-1].prompt_logprobs
    assert outputs[-1].new_token_ids == [] and got is not None and len(got) == len(expected)
    for mine, theirs in zip(got[1:], expected[1:]):
        assert mine is not None and theirs is not None
        assert abs(mine[0] - theirs[0]) < 1e-4 and mine[1] == theirs[1]
        assert [t for t, _ in mine[2]] == [t for t, _ in theirs[2]]
