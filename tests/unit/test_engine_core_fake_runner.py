"""Tests that the fake model runner (tests/fakes/engine_core.py) catches bad KV bookkeeping.

FakeRunner keeps a "KV pool" of token ids and returns logits that depend on the
whole context it reads back through the block tables, so a wrong, stale or
overwritten block changes its output.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.model.batch import ForwardBatch
from tests.fakes.engine_core import FakeRunner, reference_logits


def _batch(tokens: list[int], slots: list[int], table: list[int], start: int = 0) -> ForwardBatch:
    n = len(tokens)
    return ForwardBatch(
        input_ids=torch.tensor(tokens),
        positions=torch.arange(start, start + n),
        slot_mapping=torch.tensor(slots),
        query_lens=[n],
        context_lens=[start + n],
        block_tables=[table],
        logits_indices=torch.tensor([n - 1]),
    )


def test_fake_runner_matches_reference_when_kv_is_right() -> None:
    runner = FakeRunner(num_blocks=4, block_size=2)
    prompt = [5, 6, 7]
    logits = runner.forward(_batch(prompt, [6, 7, 2], table=[3, 1]))
    assert torch.equal(logits[0], reference_logits(prompt))
    # A decode step that reads the cached prompt back through the block table.
    logits = runner.forward(_batch([9], [3], table=[3, 1], start=3))
    assert torch.equal(logits[0], reference_logits(prompt + [9]))


def test_fake_runner_output_changes_when_a_block_is_overwritten() -> None:
    runner = FakeRunner(num_blocks=4, block_size=2)
    runner.forward(_batch([5, 6, 7], [6, 7, 2], table=[3, 1]))
    # Another sequence overwrites block 3 while the first still uses it.
    runner.forward(_batch([8, 8], [6, 7], table=[3]))
    logits = runner.forward(_batch([9], [3], table=[3, 1], start=3))
    assert not torch.equal(logits[0], reference_logits([5, 6, 7, 9]))


def test_fake_runner_refuses_a_block_table_too_short() -> None:
    runner = FakeRunner(num_blocks=4, block_size=2)
    with pytest.raises(ValueError, match="cannot hold"):
        runner.forward(_batch([1, 2, 3], [0, 1, 2], table=[0]))
