"""A fake model runner for engine-core tests, and tests that it catches bad KV bookkeeping.

FakeRunner keeps a "KV pool" of token ids: forward() writes each new token to
its slot, then rebuilds every sequence's context by reading the slots its
block table names, and returns logits that depend on that whole context.
So if the core points a sequence at a wrong, stale or overwritten block, or
skips a token, the logits (and the generated tokens) differ from the
reference computed straight from the token list.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.model.batch import ForwardBatch

VOCAB = 101


def reference_logits(context: list[int], vocab: int = VOCAB) -> torch.Tensor:
    """[vocab] float32 logits that are a deterministic function of the whole context."""
    key = 17
    for position, token in enumerate(context):
        key = (key * 1_000_003 + (token + 1) * (position + 7)) % (2**61 - 1)
    generator = torch.Generator().manual_seed(key)
    return torch.randn(vocab, generator=generator) * 3.0


def reference_greedy(
    prompt: list[int], max_tokens: int, stop_ids: set[int] = frozenset(), vocab: int = VOCAB
) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(reference_logits(tokens, vocab).argmax())
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = VOCAB) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        slots = num_blocks * block_size
        self.slot_tokens = [-1] * slots
        self.slot_positions = [-1] * slots
        self.batches: list[ForwardBatch] = []

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        self.batches.append(batch)
        total = int(batch.input_ids.numel())
        if total != sum(batch.query_lens) or batch.positions.numel() != total or batch.slot_mapping.numel() != total:
            raise ValueError("per-token tensors disagree with query_lens")
        ids = batch.input_ids.tolist()
        positions = batch.positions.tolist()
        slots = batch.slot_mapping.tolist()
        for token, position, slot in zip(ids, positions, slots):
            self.slot_tokens[slot] = token
            self.slot_positions[slot] = position
        contexts: dict[int, list[int]] = {}  # index of a sequence's last token -> its context
        offset = 0
        for query_len, context_len, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            if len(table) * self.block_size < context_len:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {context_len} tokens")
            if positions[offset + query_len - 1] != context_len - 1:
                raise ValueError("the last new token is not at position context_len - 1")
            context = []
            for p in range(context_len):
                slot = table[p // self.block_size] * self.block_size + p % self.block_size
                # A slot written for another position means stale or foreign K/V.
                context.append(self.slot_tokens[slot] if self.slot_positions[slot] == p else -1000)
            offset += query_len
            contexts[offset - 1] = context
        rows = []
        for index in batch.logits_indices.tolist():
            rows.append(reference_logits(contexts[index], self.vocab_size))
        if not rows:
            return torch.empty(0, self.vocab_size)
        return torch.stack(rows)


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
