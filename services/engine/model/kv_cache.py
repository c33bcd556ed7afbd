"""The KV pool: every layer's K and V for every block, preallocated once.

A slot id (block_id * block_size + offset, what the engine core hands out)
names one token position. Layout per layer:
- V: [num_blocks, num_kv_heads, block_size, head_dim]. One block of one head is
  a single row of block_size * head_dim values, so the torch attention path
  gathers a sequence's cache with one index_select of whole rows and gets it
  directly in the [seq * kv_head, tokens, head_dim] layout batched matmuls want.
- K: the same, or with k_dim_major (used with the native kernels)
  [num_blocks, num_kv_heads, head_dim, block_size], so that the kernel computes
  q.k for a block's tokens with vertical SIMD (see csrc/paged_attention.c).

The pool's dtype is the plan's ``kv_cache_dtype``: the model's dtype, or
float8_e5m2 (SCALELLM_KV_CACHE_DTYPE=fp8_e5m2), one byte per value, so the
same memory holds twice the blocks of bf16. torch has no index_copy_ for
float8 on the CPU, so writers copy its bytes through a uint8 view
(attention.py); index_select and .to() work on it directly.
"""

from __future__ import annotations

import torch


def kv_bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers, K and V together."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def num_blocks_for(
    kv_cache_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """How many whole blocks fit in kv_cache_bytes."""
    per_block = kv_bytes_per_block(
        num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
    )
    return kv_cache_bytes // per_block


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        k_dim_major: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_dim_major = k_dim_major
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        k_shape = (num_layers, num_blocks, num_kv_heads, head_dim, block_size) if k_dim_major else shape
        # Zeros, not empty: padded attention reads of never-written slots get
        # zero probability, and 0 * NaN garbage would still poison the output.
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer (layouts: module docstring)."""
        return self.k[index], self.v[index]
