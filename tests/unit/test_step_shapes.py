"""The step sizes the CPU engine computes at (shapes.py): few distinct, little padding."""

from __future__ import annotations

import pytest

from services.engine.model.shapes import EXACT_UP_TO, padded_attention_len, padded_token_count


def test_decode_sized_steps_are_not_padded() -> None:
    assert [padded_token_count(t) for t in range(1, EXACT_UP_TO + 1)] == list(range(1, EXACT_UP_TO + 1))


def test_larger_steps_pad_by_under_an_eighth_to_few_distinct_sizes() -> None:
    sizes = range(EXACT_UP_TO + 1, 8193)
    padded = [padded_token_count(t) for t in sizes]
    assert all(t <= p < t * 1.125 for t, p in zip(sizes, padded, strict=True))
    assert all(padded_token_count(p) == p for p in padded)  # a bucket is its own bucket
    # 8 buckets per doubling from 64 to 8192: 7 doublings, plus the exact sizes below.
    assert len(set(padded)) == 7 * 8
    assert padded_token_count(65) == 72 and padded_token_count(500) == 512 and padded_token_count(513) == 576


def test_an_empty_step_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        padded_token_count(0)


def test_prefill_attention_pads_by_under_a_quarter_to_few_distinct_shapes() -> None:
    lengths = range(17, 8193)
    padded = [padded_attention_len(n) for n in lengths]
    assert all(n <= p < n * 1.25 for n, p in zip(lengths, padded, strict=True))
    assert [padded_attention_len(n) for n in range(1, 17)] == list(range(1, 17))
    assert padded_attention_len(41, 4) == 48 and padded_attention_len(100, 16) % 16 == 0
    # What bounds the engine's memory: the (queries, keys) shapes of every chunk of up to
    # 512 tokens after any cached prefix of whole 16-token blocks, up to 8k of context.
    shapes = {
        (padded_attention_len(chunk), padded_attention_len(-(-(cached + chunk) // 16) * 16, 16))
        for chunk in range(2, 513)
        for cached in range(0, 8192 - chunk, 16)
    }
    assert len(shapes) < 1000, len(shapes)
