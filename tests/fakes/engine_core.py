"""A fake model runner for engine-core tests, and helpers that drive an EngineCore on it.

FakeRunner keeps a "KV pool" of token ids: forward() writes each new token to
its slot, then rebuilds every sequence's context by reading the slots its
block table names, and returns logits that depend on that whole context.
So if the core points a sequence at a wrong, stale or overwritten block, or
skips a token, the logits (and the generated tokens) differ from the
reference computed straight from the token list.
"""

from __future__ import annotations

import random

import torch

from services.engine.contract import RequestOutput
from services.engine.core.engine_core import EngineCore, EngineCoreConfig
from services.engine.model.batch import ForwardBatch
from shared.messages import SamplingParams

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
        tables: dict[int, list[int]] = {}  # index of each new token -> its sequence's block table
        offset = 0
        for query_len, context_len, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            if len(table) * self.block_size < context_len:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {context_len} tokens")
            if positions[offset + query_len - 1] != context_len - 1:
                raise ValueError("the last new token is not at position context_len - 1")
            for index in range(offset, offset + query_len):
                tables[index] = table
            offset += query_len
        rows = []
        for index in batch.logits_indices.tolist():
            # The logits at any new token (the last one of a sequence, or a prompt position whose
            # logprob is wanted) depend on the context up to it, read back from the "KV pool".
            table = tables[index]
            context = []
            for p in range(positions[index] + 1):
                slot = table[p // self.block_size] * self.block_size + p % self.block_size
                # A slot written for another position means stale or foreign K/V.
                context.append(self.slot_tokens[slot] if self.slot_positions[slot] == p else -1000)
            rows.append(reference_logits(context, self.vocab_size))
        if not rows:
            return torch.empty(0, self.vocab_size)
        return torch.stack(rows)


def make_engine(
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_running_requests: int = 16,
    max_model_len: int = 1024,
    enable_prefix_caching: bool = True,
    default_eos: list[int] | None = None,
) -> EngineCore:
    runner = FakeRunner(num_blocks, block_size)
    config = EngineCoreConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        vocab_size=VOCAB,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        max_running_requests=max_running_requests,
        enable_prefix_caching=enable_prefix_caching,
        default_eos_token_ids=default_eos or [],
        sampler_seed=0,
    )
    return EngineCore(runner, config)


def runner_of(core: EngineCore) -> FakeRunner:
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    return runner


def greedy(max_tokens: int = 8, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def run(core: EngineCore, max_steps: int = 10_000) -> dict[str, tuple[list[int], str | None, list[RequestOutput]]]:
    """Step until done; per request: tokens, finish reason, raw outputs."""
    results: dict[str, tuple[list[int], str | None, list[RequestOutput]]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            break
        for out in core.step():
            tokens, finish, outs = results.setdefault(out.request_id, ([], None, []))
            tokens.extend(out.new_token_ids)
            outs.append(out)
            if out.finish_reason is not None:
                if finish is not None:
                    raise AssertionError(f"{out.request_id} finished twice")
                results[out.request_id] = (tokens, out.finish_reason, outs)
    else:
        raise AssertionError("engine did not finish")
    return results


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def assert_all_blocks_free(core: EngineCore) -> None:
    bm = core.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(count == 0 for count in bm.ref_counts)
