"""The step sizes the CPU engine computes at (shapes.py): few distinct, little padding."""

from __future__ import annotations

import pytest

from services.engine.model.shapes import EXACT_UP_TO, padded_token_count


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
