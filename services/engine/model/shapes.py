"""How many token rows a step's matmuls run on: the step's T, rounded up to a bucket.

On the CPU, oneDNN creates (and keeps, in its primitive cache) a kernel for
every distinct matrix shape, and the allocator keeps the differently sized
buffers of every distinct step size. A serving engine sees almost every T
from 1 to max_num_batched_tokens (decodes plus a prefill chunk of any
length), so its memory grew with uptime: +23% over a 10-minute soak, still
growing. Rounding T up to a bucket bounds the distinct shapes; the padding
rows are computed and thrown away, never attended to or stored in the KV pool.

Steps of up to EXACT_UP_TO tokens (decode batches) are not padded: padding
a batch of 3 decodes to 8 would cost a small step a visible share of its
time. Above it, buckets are an eighth of the power of two below T wide, so
padding adds less than 12.5% of the rows (6% on average) and the number of
distinct shapes grows with the log of the step size: 64 + 8 per doubling.
"""

from __future__ import annotations

EXACT_UP_TO = 64
_BUCKETS_PER_DOUBLING = 8


def padded_token_count(num_tokens: int) -> int:
    """The row count a step of num_tokens tokens is computed at (>= num_tokens)."""
    if num_tokens < 1:
        raise ValueError(f"a step has at least one token, got {num_tokens}")
    if num_tokens <= EXACT_UP_TO:
        return num_tokens
    width = max(1, (1 << (num_tokens.bit_length() - 1)) // _BUCKETS_PER_DOUBLING)
    return -(-num_tokens // width) * width


# Prefill attention runs one matmul pair per sequence, shaped by the chunk's query
# count and its key count (up to the whole context): two more dimensions that take
# almost every value. Coarser buckets than the step's (a quarter of the power of two
# below: under 25% more attention work, a small share of a prefill's) keep the number
# of (queries, keys) pairs oneDNN builds kernels for under a thousand (992 for chunks of
# up to 512 tokens in contexts of up to 8k), within its primitive cache's 1024. Measured
# [AMD EPYC Zen 5, avx512_bf16]: 1000 soak-like steps (bf16, 64 running, prompts 8-700)
# grew the engine's RSS by 516 MB unpadded, 59 MB padded (flat after 500 steps);
# prefill CPU time +0-4%.
_ATTENTION_EXACT_UP_TO = 16
_ATTENTION_BUCKETS_PER_DOUBLING = 4


def padded_attention_len(length: int, multiple: int = 1) -> int:
    """The query or key count a prefill attention matmul runs at: >= length, a multiple of ``multiple``."""
    if length < 1:
        raise ValueError(f"attention needs at least one query and one key, got {length}")
    if length > _ATTENTION_EXACT_UP_TO:
        width = max(1, (1 << (length.bit_length() - 1)) // _ATTENTION_BUCKETS_PER_DOUBLING)
        length = -(-length // width) * width
    return -(-length // multiple) * multiple
