"""Paged attention over the KV pool, in plain torch.

Per step, ``AttentionMetadata.build`` (attention_metadata.py) turns the batch's block tables into
index tensors and masks once; every layer reuses them. Per layer,
``paged_attention`` writes the new tokens' K/V into their slots, then:

- decode sequences (one new token each) are batched into one call. With the
  native kernel (native.py) it reads the blocks in place. Otherwise each
  sequence's blocks are gathered from the pool, padded to the longest context,
  and attended with a mask, as batched matmuls in which the query heads
  sharing a KV head form the rows (GQA without copying K/V per query head);
- prefill chunks are attended one sequence at a time, by SDPA with GQA
  (``enable_gqa``: no K/V copy per query head): over the fresh K/V, causal,
  when nothing is cached before the chunk, otherwise over the gathered cache,
  with a causal mask shifted by the cached length. Queries and keys are
  padded to shapes.py's attention buckets, which bound the kernel shapes the
  CPU builds. (torch 2.13's flash kernel on the CPU, bf16, 9 query / 3 KV
  heads of 64: 104 against 184 us for 128 fresh tokens, 0.37 against 1.40 ms
  for 128 tokens after 512 cached, against the batched matmuls used before
  [Intel Xeon, Sapphire Rapids class, 2 threads].)

Cache layout: see kv_cache.py. V is [num_blocks, num_kv_heads, block_size, head_dim];
K is the same, or with the native decode kernel dim-major: [num_blocks, num_kv_heads,
head_dim, block_size] (``KernelPlan.k_dim_major``); an int8 pool (the int8 KV cache, native
kernels only) holds per layer [num_blocks, num_kv_heads, chunk] int8, a chunk being those values
of one block and head followed by their tokens' float32 scales: stores quantize
(kv_cache.quantize_int8), the prefill gather dequantizes. Which kernels run, the K layout,
who stores the new K/V and the dtype scores are computed in all come from the
kernel plan (plan.py); nothing here decides them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model.attention_metadata import AttentionMetadata, DecodeGroup, PrefillSeq
from services.engine.model.kv_cache import dequantize_int8, int8_pool_geometry, quantize_int8, split_int8
from services.engine.model.native import NativeKernels


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the step's tokens over their sequences' cached context.

    q: [T, H, D]; k, v: [T, KV, D] for the new tokens (already rotated);
    k_cache, v_cache: one layer of the pool (layouts: module docstring).
    Unless meta.store_kv is False (a native kernel of the plan has already
    written k, v into the pool), k and v are stored at their slots first.
    Returns [T, H * D].
    """
    num_tokens, num_heads, head_dim = q.shape
    int8 = v_cache.dtype == torch.int8
    num_kv_heads = v_cache.shape[1]
    block_size = int8_pool_geometry(v_cache.shape[2], head_dim) if int8 else v_cache.shape[2]
    group = num_heads // num_kv_heads
    if meta.store_kv:
        if meta.write_rows is None or meta.k_write is None:
            raise RuntimeError("attention metadata without write indices cannot store K/V")
        if int8:
            _store_int8(k_cache, v_cache, meta.write_rows, k, v, block_size)
        elif meta.k_dim_major:
            _store(k_cache.view(-1), meta.k_write, k.reshape(-1))
        else:
            _store(k_cache.view(-1, head_dim), meta.k_write, k.reshape(-1, head_dim))
        if not int8:
            _store(v_cache.view(-1, head_dim), meta.write_rows, v.reshape(-1, head_dim))
    # One (block, KV head) a row: its values (int8: and scales).
    k_blocks = k_cache.view(-1, v_cache.shape[2] if int8 else block_size * head_dim)
    v_blocks = v_cache.view(-1, v_cache.shape[2] if int8 else block_size * head_dim)

    decode = meta.decode
    if decode is not None and decode.num_seqs == num_tokens:
        return _decode(q, k_cache, v_cache, decode, group, scale, meta.native)
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if decode is not None:
        result = _decode(q[decode.tokens], k_cache, v_cache, decode, group, scale, meta.native)
        if isinstance(decode.tokens, slice):
            out[decode.tokens] = result
        else:
            out.index_copy_(0, decode.tokens, result)
    for seq in meta.prefills:
        out[seq.start : seq.end] = _prefill(
            q, k, v, k_blocks, v_blocks, seq, num_kv_heads, block_size, scale, meta.k_dim_major
        )
    return out


class FreshPrefill:
    """Attention of a step that is one sequence's first chunk at an attention bucket's length
    (``AttentionMetadata.fresh_prefill``), bound once for the step: ``paged_attention``'s answer for
    it, bit for bit (the same SDPA call on the same views), without its per-layer work. The
    q / k / v views of the fused qkv rows are made once (the workspace's qkv buffer is the same
    for every layer), and the SDPA output, laid out [1, T, H, D] by the CPU's flash kernel, is
    returned as a [T, H * D] view instead of being copied into a new tensor. That per-layer work
    was ~50 us of Python and copies per layer at 128 tokens (Intel Xeon SPR, avx512f/amx).

    The caller has stored the chunk's K/V in the pool (a native rope_store): nothing is stored here."""

    __slots__ = ("_heads", "_key", "_scale", "_shape", "_tokens", "_views")

    def __init__(self, tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self._tokens = tokens
        self._heads = num_heads
        self._shape = (tokens, num_heads + 2 * num_kv_heads, head_dim)
        self._scale = scale
        self._key: tuple[int, int] = (0, 0)
        self._views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [>= tokens, (H + 2 KV) * D] contiguous rows, q and k rotated -> [tokens, H * D]
        (a new tensor per call)."""
        key = (qkv.data_ptr(), qkv.stride(0))
        views = self._views
        if views is None or key != self._key:
            views = self._views = self._bind(qkv)
            self._key = key
        out = F.scaled_dot_product_attention(*views, is_causal=True, scale=self._scale, enable_gqa=True)
        # [1, H, T, D], strided over a [1, T, H, D] buffer: then [T, H * D] is a view.
        return out[0].transpose(0, 1).reshape(self._tokens, -1)

    def _bind(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[1, H, T, D], [1, KV, T, D], [1, KV, T, D] views of qkv's rows: _prefill's."""
        heads, kv_heads = self._heads, (self._shape[1] - self._heads) // 2
        rows = qkv[: self._tokens].view(self._shape).transpose(0, 1)
        return rows[None, :heads], rows[None, heads : heads + kv_heads], rows[None, heads + kv_heads :]


def _store(cache: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """cache[index] = values along dim 0, rounded to the cache's dtype. cache: [N, ...] view of
    the pool; index: [n] int64; values: [n, ...]."""
    if cache.dtype == torch.float8_e5m2:
        # No float8 index_copy_ on the CPU: the rounded values' bytes are copied instead.
        cache.view(torch.uint8).index_copy_(0, index, values.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, index, values)


def _store_int8(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
) -> None:
    """Quantize k, v [T, KV, D] (kv_cache.quantize_int8) into one layer of an int8 pool ([blocks, KV,
    chunk] each, K dim-major): rows [T * KV] (token-major) are V's row numbers in the bf16 layout,
    chunk * block_size + offset, which name the chunk and the token's column in it."""
    head_dim = k.shape[-1]
    chunks, offsets = rows // block_size, rows % block_size
    for cache, new, dim_major in ((k_cache, k, True), (v_cache, v, False)):
        quantized, scales = quantize_int8(new.reshape(-1, head_dim))
        values, scale_rows = split_int8(cache.view(-1, cache.shape[-1]), head_dim)
        if dim_major:
            values.view(-1, head_dim, block_size)[chunks, :, offsets] = quantized
        else:
            values.view(-1, block_size, head_dim)[chunks, offsets] = quantized
        scale_rows[chunks, offsets] = scales


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group_meta: DecodeGroup,
    group: int,
    scale: float,
    native: NativeKernels | None,
) -> torch.Tensor:
    """q: [B, H, D] -> [B, H * D]."""
    if native is not None:
        return native.decode(q, k_cache, v_cache, group_meta.block_table, group_meta.context_lens, scale)
    if k_cache.dtype == torch.int8:
        raise RuntimeError("an int8 KV pool is read by the native decode kernel only (plan.py)")
    if group_meta.gather_rows is None or group_meta.mask is None:
        raise RuntimeError("decode metadata was built for the native kernel")
    batch, num_heads, head_dim = q.shape
    block_size = k_cache.shape[2]
    rows = group_meta.num_seqs * (num_heads // group)
    k_blocks = k_cache.view(-1, block_size * head_dim)
    v_blocks = v_cache.view(-1, block_size * head_dim)
    # The mask is in the plan's compute dtype: float32 where the CPU cannot multiply bf16.
    compute = group_meta.mask.dtype
    keys = k_blocks.index_select(0, group_meta.gather_rows).view(rows, group_meta.padded_len, head_dim).to(compute)
    values = v_blocks.index_select(0, group_meta.gather_rows).view(rows, group_meta.padded_len, head_dim).to(compute)
    # Query heads sharing a KV head are consecutive: [B, KV * G, D] -> [B * KV, G, D].
    queries = q.reshape(rows, group, head_dim).to(compute)
    scores = torch.baddbmm(group_meta.mask, queries, keys.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, values).view(batch, num_heads * head_dim).to(q.dtype)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    seq: PrefillSeq,
    num_kv_heads: int,
    block_size: int,
    scale: float,
    k_dim_major: bool,
) -> torch.Tensor:
    """One sequence's chunk: q [T, H, D], k/v [T, KV, D] -> [chunk, H * D]; k_blocks, v_blocks:
    the layer's pool, a (block, KV head) a row (int8: chunks, dequantized once gathered).

    One SDPA call at the chunk's padded shape (its flash kernel tiles the scores and
    shares each KV head with its query group); the padding query rows are thrown away."""
    chunk = seq.end - seq.start
    num_heads, head_dim = q.shape[1], q.shape[2]
    compute = seq.mask.dtype  # the plan's compute dtype (see _decode)
    padded = seq.padded_queries
    queries = _padded_heads(q[seq.start : seq.end], padded, compute)
    if seq.gather_rows is None:
        # Zero keys and values past the chunk's: the causal mask hides them from every real query.
        keys = _padded_heads(k[seq.start : seq.end], seq.padded_keys, compute)
        values = _padded_heads(v[seq.start : seq.end], seq.padded_keys, compute)
        mask = None
    else:
        keys = k_blocks.index_select(0, seq.gather_rows)
        values = v_blocks.index_select(0, seq.gather_rows)
        if keys.dtype == torch.int8:  # chunks of values and scales, widened in float32 (kv_cache.py)
            keys = dequantize_int8(keys, head_dim, dim_major=k_dim_major)
            values = dequantize_int8(values, head_dim, dim_major=False)
        if k_dim_major:  # [KV * blocks, D * block_size] -> [KV, blocks * block_size, D]
            keys = keys.view(num_kv_heads, -1, head_dim, block_size).transpose(2, 3)
        keys = keys.reshape(num_kv_heads, -1, head_dim).to(compute)
        values = values.reshape(num_kv_heads, -1, head_dim).to(compute)
        mask = seq.mask
    out = F.scaled_dot_product_attention(
        queries[None],
        keys[None],
        values[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )  # [1, H, padded, D]
    return out[0, :, :chunk].transpose(0, 1).reshape(chunk, num_heads * head_dim).to(q.dtype)


def _padded_heads(rows: torch.Tensor, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, heads, D] -> [heads, padded, D] in ``dtype``, zero past n (a view when nothing needs padding)."""
    count, heads, head_dim = rows.shape
    if padded == count:
        return rows.transpose(0, 1).to(dtype)
    out = torch.zeros(heads, padded, head_dim, dtype=dtype, device=rows.device)
    out[:, :count] = rows.transpose(0, 1)
    return out
