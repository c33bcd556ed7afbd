"""ForwardBatch: what the engine core hands the model runner every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """One step's work for the model.

    Sequences appear in the same order in every per-sequence field; their new
    tokens are concatenated in that order into the per-token tensors.
    """

    input_ids: torch.Tensor  # [T] int64: the new tokens of every scheduled sequence, concatenated in sequence order
    positions: torch.Tensor  # [T] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: KV slot where each token's K/V is written (block_id * block_size + offset)
    query_lens: list[int]  # per sequence: new tokens this step (1 for decode, a chunk for prefill)
    context_lens: list[int]  # per sequence: tokens in the KV cache after this step (cached + new)
    block_tables: list[list[int]]  # per sequence: its block ids, covering context_lens
    logits_indices: torch.Tensor  # [S] int64: indices into T whose next-token logits are wanted (last token of each sequence that samples this step)
