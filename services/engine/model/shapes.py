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
