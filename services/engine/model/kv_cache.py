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

int8 (SCALELLM_KV_CACHE_DTYPE=int8): each K and V vector of one token and one KV
head is stored as head_dim int8 values and one float32 scale (``quantize_int8``).
The scales live inside the pool tensors, so that ``k`` and ``v`` stay one tensor
each (the layer kernels, the attention and block sharing take them as they are)
and a block's scales lie next to its values (the same pages, read in the same
runs by the decode kernel): each layer is [num_blocks, num_kv_heads, chunk] int8,
a chunk of (head_dim + 4) * block_size bytes holding one block of one KV head:
its values laid out as in a bf16 pool (K dim-major [head_dim, block_size], V
[block_size, head_dim]), then the block_size tokens' float32 scales. One block
costs (head_dim + 4) / (2 * head_dim) of bf16's bytes (0.53 for head_dim 64).
``int8_pool_geometry`` reads block_size back from a chunk, ``split_int8`` views
a chunk's values and scales, and ``dequantize_int8`` widens chunks (the prefill
path's gather, tests).
"""

from __future__ import annotations

import torch

# The float32 scale after each token's int8 values (per chunk: block_size of them).
INT8_SCALE_BYTES = 4
# Vectors whose largest magnitude is below this store zeros with scale 0 (csrc/kv_int8.c).
INT8_MIN_AMAX = 2.0**-64
# (float)(1 / 127): the scale is absmax times it, a product that -ffast-math keeps as it is.
_INV127 = torch.tensor(1 / 127, dtype=torch.float32)


def int8_chunk_bytes(block_size: int, head_dim: int) -> int:
    """Bytes of one (block, KV head) chunk of an int8 pool: the values, then block_size float32 scales."""
    return (head_dim + INT8_SCALE_BYTES) * block_size


def kv_bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers, K and V together (int8: values and scales)."""
    if dtype == torch.int8:
        return 2 * num_layers * num_kv_heads * int8_chunk_bytes(block_size, head_dim)
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


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (int8 [..., D], float32 scales [...]): per vector,
    scale = absmax * (1/127) in float32 (0 where absmax < 2^-64), q = round_half_even(x * (1 / scale)),
    so x ~ q * scale with |q| <= 127. The native stores (csrc/kv_int8.c) compute exactly this."""
    values = x.float()
    amax = values.abs().amax(-1)
    scale = torch.where(amax >= INT8_MIN_AMAX, amax * _INV127, 0.0)
    inverse = torch.where(scale > 0, torch.reciprocal(scale), 0.0)
    quantized = (values * inverse[..., None]).round().clamp_(-127, 127).to(torch.int8)
    return quantized, scale


def int8_pool_geometry(chunk_bytes: int, head_dim: int) -> int:
    """block_size of an int8 pool whose chunks are chunk_bytes long, for head_dim."""
    block_size, rest = divmod(chunk_bytes, head_dim + INT8_SCALE_BYTES)
    if rest or block_size < 1:
        raise ValueError(f"{chunk_bytes}-byte chunks are not an int8 pool's for head_dim {head_dim}")
    return block_size


def split_int8(chunks: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of int8 chunks [..., chunk]: (values int8 [..., head_dim * block_size], scales float32
    [..., block_size]). chunks' last dimension must be contiguous (rows of a pool view are)."""
    block_size = int8_pool_geometry(chunks.shape[-1], head_dim)
    split = head_dim * block_size
    return chunks[..., :split], chunks[..., split:].view(torch.float32)


def dequantize_int8(chunks: torch.Tensor, head_dim: int, *, dim_major: bool) -> torch.Tensor:
    """int8 chunks [..., chunk] -> float32 values in the bf16 pool's layout: [..., head_dim,
    block_size] for dim-major K (dim_major), [..., block_size, head_dim] for V."""
    values, scales = split_int8(chunks, head_dim)
    block_size = scales.shape[-1]
    if dim_major:
        return values.float().view(*values.shape[:-1], head_dim, block_size) * scales[..., None, :]
    return values.float().view(*values.shape[:-1], block_size, head_dim) * scales[..., None]


def quantize_int8_pool(x: torch.Tensor, *, dim_major: bool) -> torch.Tensor:
    """A pool's values in the bf16 layout ([..., D, block_size] for dim-major K, else [..., block_size, D])
    -> int8 chunks [..., (D + 4) * block_size], each token's vector quantized (tests, self-checks)."""
    vectors = x.transpose(-1, -2) if dim_major else x  # [..., block_size, D]
    quantized, scales = quantize_int8(vectors)
    if dim_major:
        quantized = quantized.transpose(-1, -2)
    values = quantized.contiguous().flatten(-2)
    return torch.cat([values, scales.contiguous().view(torch.int8)], dim=-1)


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
        shape: tuple[int, ...] = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        k_shape = (num_layers, num_blocks, num_kv_heads, head_dim, block_size) if k_dim_major else shape
        if dtype == torch.int8:
            if head_dim % INT8_SCALE_BYTES:
                raise ValueError(f"an int8 KV cache needs head_dim % 4 == 0 (its float32 scales), not {head_dim}")
            if not k_dim_major:
                raise ValueError("an int8 KV cache is read by the native kernels only, with dim-major K")
            shape = k_shape = (num_layers, num_blocks, num_kv_heads, int8_chunk_bytes(block_size, head_dim))
        # Zeros, not empty: padded attention reads of never-written slots get
        # zero probability, and 0 * NaN garbage would still poison the output.
        # (An int8 chunk of zeros is zeros with scale 0.)
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer (layouts: module docstring)."""
        return self.k[index], self.v[index]
