"""Paged attention over the KV pool, in plain torch.

Per step, ``AttentionMetadata.build`` turns the batch's block tables into
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
head_dim, block_size] (``KernelPlan.k_dim_major``). Which kernels run, the K layout,
who stores the new K/V and the dtype scores are computed in all come from the
kernel plan (plan.py); nothing here decides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.model.native import NativeKernels
from services.engine.model.plan import KernelPlan
from services.engine.model.shapes import padded_attention_len


@dataclass(slots=True)
class DecodeGroup:
    tokens: slice | torch.Tensor  # which of the step's T tokens are the decode tokens, in order
    num_seqs: int
    padded_len: int  # Lp: the longest context rounded up to whole blocks
    block_table: torch.Tensor  # [num_seqs, Lp / block_size] int64, padded with block 0
    context_lens: torch.Tensor  # [num_seqs] int64
    # The torch path only (None with the native kernel):
    gather_rows: (
        torch.Tensor | None
    )  # [num_seqs * kv_heads * blocks] rows of the pool's [blocks * kv_heads, block_size * D] view
    mask: torch.Tensor | None  # [num_seqs * kv_heads, 1, Lp] additive: 0 inside the context, -inf past it


@dataclass(slots=True)
class PrefillSeq:
    start: int  # token range [start, end) of this chunk within the step's T tokens
    end: int
    context_len: int
    # The chunk's query count and its key count rounded up to shapes.padded_attention_len
    # buckets: the matmuls run at these, on zero rows and masked keys past the real ones.
    padded_queries: int
    padded_keys: int
    gather_rows: torch.Tensor | None  # [kv_heads * padded_keys / block_size] when tokens are cached before the chunk
    # [padded_queries, padded_keys] additive: 0 where the query may look, -inf elsewhere
    # (keys past the context included). Also what carries the plan's compute dtype.
    mask: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    write_rows: torch.Tensor  # [T * kv_heads] rows of the V pool's [slots * kv_heads, D] view, token-major
    # Where each new K value goes: rows like write_rows, or with dim-major K,
    # [T * kv_heads * D] element offsets into the flat K pool.
    k_write: torch.Tensor
    k_dim_major: bool
    store_kv: bool  # paged_attention writes the new K/V into the pool (False: a native kernel already did)
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]
    num_tokens: int
    native: NativeKernels | None  # the native decode kernel, when the plan uses it

    @classmethod
    def build(
        cls,
        *,
        slot_mapping: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        plan: KernelPlan,
    ) -> AttentionMetadata:
        """Index tensors and masks for one step; the caller has validated the batch.

        From the plan: the native decode kernel or torch, the K layout
        (``plan.k_dim_major``; head_dim addresses dim-major K), whether torch
        stores the new K/V (not when ``plan.stores_kv_natively``), and the dtype
        scores are computed in (the masks' dtype, ``plan.compute_dtype``)."""
        native = plan.native
        dtype = plan.compute_dtype
        heads = torch.arange(num_kv_heads, device=device)
        slots = slot_mapping.to(device=device, dtype=torch.long)
        block, offset = slots // block_size, slots % block_size
        write_rows = ((block[:, None] * num_kv_heads + heads[None, :]) * block_size + offset[:, None]).reshape(-1)
        k_dim_major = plan.k_dim_major
        k_write = write_rows
        if k_dim_major and not plan.stores_kv_natively:
            dims = torch.arange(head_dim, device=device)
            base = (block[:, None] * num_kv_heads + heads[None, :]) * head_dim  # [T, KV]
            k_write = ((base[:, :, None] + dims[None, None, :]) * block_size + offset[:, None, None]).reshape(-1)

        decode_seqs: list[int] = []
        decode_tokens: list[int] = []
        prefills: list[PrefillSeq] = []
        start = 0
        for i, q_len in enumerate(query_lens):
            if q_len == 1:
                decode_seqs.append(i)
                decode_tokens.append(start)
            else:
                prefills.append(
                    _prefill_seq(
                        start,
                        q_len,
                        context_lens[i],
                        block_tables[i],
                        block_size,
                        num_kv_heads,
                        heads,
                        dtype,
                        device,
                    )
                )
            start += q_len
        decode = None
        if decode_seqs:
            decode = _decode_group(
                decode_seqs,
                decode_tokens,
                context_lens,
                block_tables,
                block_size,
                num_kv_heads,
                heads,
                dtype,
                device,
                with_gather=native is None,
            )
        return cls(
            write_rows=write_rows,
            k_write=k_write,
            k_dim_major=k_dim_major,
            store_kv=not plan.stores_kv_natively,
            decode=decode,
            prefills=prefills,
            num_tokens=start,
            native=native,
        )


def _decode_group(
    seqs: list[int],
    tokens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    heads: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    with_gather: bool,
) -> DecodeGroup:
    lens = [context_lens[i] for i in seqs]
    max_blocks = (max(lens) + block_size - 1) // block_size
    # Pad short tables with block 0: its rows are read but masked out.
    table = torch.tensor(
        [block_tables[i][:max_blocks] + [0] * (max_blocks - len(block_tables[i][:max_blocks])) for i in seqs],
        dtype=torch.long,
        device=device,
    )
    padded_len = max_blocks * block_size
    ctx = torch.tensor(lens, dtype=torch.long, device=device)
    gather_rows = mask = None
    if with_gather:
        gather_rows = (table[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1)
        visible = torch.arange(padded_len, device=device)[None, :] < ctx[:, None]  # [B, Lp]
        mask = torch.zeros(len(seqs), padded_len, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None, :].expand(len(seqs), num_kv_heads, 1, padded_len).reshape(-1, 1, padded_len)
    first = tokens[0]
    contiguous = tokens == list(range(first, first + len(tokens)))
    token_index: slice | torch.Tensor = (
        slice(first, first + len(tokens)) if contiguous else torch.tensor(tokens, dtype=torch.long, device=device)
    )
    return DecodeGroup(
        tokens=token_index,
        num_seqs=len(seqs),
        padded_len=padded_len,
        block_table=table,
        context_lens=ctx,
        gather_rows=gather_rows,
        mask=mask,
    )


def _prefill_seq(
    start: int,
    q_len: int,
    context_len: int,
    block_table: list[int],
    block_size: int,
    num_kv_heads: int,
    heads: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> PrefillSeq:
    gather_rows = None
    padded_queries = padded_attention_len(q_len)
    key_len = padded_queries
    if context_len != q_len:
        num_blocks = (context_len + block_size - 1) // block_size
        key_len = padded_attention_len(num_blocks * block_size, block_size)
        # The padding blocks are block 0, whatever it holds: the mask hides them.
        padded_table = block_table[:num_blocks] + [0] * (key_len // block_size - num_blocks)
        table = torch.tensor(padded_table, dtype=torch.long, device=device)
        gather_rows = (table[None, :] * num_kv_heads + heads[:, None]).reshape(-1)
    # Query i sits at position context_len - q_len + i and sees keys up to it;
    # that also hides the keys past context_len. Padding queries (i >= q_len) see
    # every key: their rows are thrown away, but must not be all -inf (NaN).
    query_pos = torch.arange(context_len - q_len, context_len - q_len + padded_queries, device=device)
    visible = torch.arange(key_len, device=device)[None, :] <= query_pos[:, None]
    mask = torch.zeros(padded_queries, key_len, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return PrefillSeq(
        start=start,
        end=start + q_len,
        context_len=context_len,
        padded_queries=padded_queries,
        padded_keys=key_len,
        gather_rows=gather_rows,
        mask=mask,
    )


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
    num_kv_heads, block_size = v_cache.shape[1], v_cache.shape[2]
    group = num_heads // num_kv_heads
    if meta.store_kv:
        if meta.k_dim_major:
            _store(k_cache.view(-1), meta.k_write, k.reshape(-1))
        else:
            _store(k_cache.view(-1, head_dim), meta.k_write, k.reshape(-1, head_dim))
        _store(v_cache.view(-1, head_dim), meta.write_rows, v.reshape(-1, head_dim))
    k_blocks = k_cache.view(-1, block_size * head_dim)
    v_blocks = v_cache.view(-1, block_size * head_dim)

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
            q, k, v, k_blocks, v_blocks, seq, num_kv_heads, head_dim, scale, meta.k_dim_major
        )
    return out


def _store(cache: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """cache[index] = values along dim 0, rounded to the cache's dtype. cache: [N, ...] view of
    the pool; index: [n] int64; values: [n, ...]."""
    if cache.dtype == torch.float8_e5m2:
        # No float8 index_copy_ on the CPU: the rounded values' bytes are copied instead.
        cache.view(torch.uint8).index_copy_(0, index, values.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, index, values)


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
    head_dim: int,
    scale: float,
    k_dim_major: bool,
) -> torch.Tensor:
    """One sequence's chunk: q [T, H, D], k/v [T, KV, D] -> [chunk, H * D].

    One SDPA call at the chunk's padded shape (its flash kernel tiles the scores and
    shares each KV head with its query group); the padding query rows are thrown away."""
    chunk = seq.end - seq.start
    num_heads = q.shape[1]
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
        if k_dim_major:  # [KV * blocks, D * block_size] -> [KV, blocks * block_size, D]
            keys = keys.view(num_kv_heads, -1, head_dim, k_blocks.shape[1] // head_dim).transpose(2, 3)
        keys = keys.reshape(num_kv_heads, -1, head_dim).to(compute)
        values = v_blocks.index_select(0, seq.gather_rows).view(num_kv_heads, -1, head_dim).to(compute)
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
