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

import functools
import struct
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
    # [T * kv_heads] rows of the V pool's [slots * kv_heads, D] view, token-major. None when
    # store_kv is False: nothing stores through them then.
    write_rows: torch.Tensor | None
    # Where each new K value goes: rows like write_rows, or with dim-major K,
    # [T * kv_heads * D] element offsets into the flat K pool. None with write_rows.
    k_write: torch.Tensor | None
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
        scores are computed in (the masks' dtype, ``plan.compute_dtype``).

        Only what the plan's path reads is built (this runs every step, and at a few
        tokens each torch op's overhead is the cost): no write indices when a native
        kernel stores K/V, no gather rows or masks for the native decode kernel."""
        native = plan.native
        dtype = plan.compute_dtype
        k_dim_major = plan.k_dim_major
        store_kv = not plan.stores_kv_natively
        write_rows = k_write = None
        if store_kv:
            write_rows, k_write = _write_indices(slot_mapping, block_size, num_kv_heads, head_dim, k_dim_major, device)

        decode, prefills, num_tokens = _groups(
            query_lens, context_lens, block_tables, block_size, num_kv_heads, dtype, device, with_gather=native is None
        )
        return cls(
            write_rows=write_rows,
            k_write=k_write,
            k_dim_major=k_dim_major,
            store_kv=store_kv,
            decode=decode,
            prefills=prefills,
            num_tokens=num_tokens,
            native=native,
        )


def _groups(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    with_gather: bool,
) -> tuple[DecodeGroup | None, list[PrefillSeq], int]:
    """The step's decodes (one group) and prefills (one each), and its token count."""
    num_seqs = len(query_lens)
    if query_lens.count(1) == num_seqs:  # decodes only, the usual step: one token each, in order
        if not num_seqs:
            return None, [], 0
        decode = _decode_group(
            slice(0, num_seqs),
            context_lens,
            block_tables,
            block_size,
            num_kv_heads,
            dtype,
            device,
            with_gather=with_gather,
        )
        return decode, [], num_seqs

    prefills: list[PrefillSeq] = []
    decode_seqs: list[int] = []
    decode_tokens: list[int] = []
    start = 0
    for i, q_len in enumerate(query_lens):
        if q_len == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        else:
            prefills.append(
                _prefill_seq(start, q_len, context_lens[i], block_tables[i], block_size, num_kv_heads, dtype, device)
            )
        start += q_len
    if not decode_seqs:
        return None, prefills, start
    first = decode_tokens[0]
    contiguous = decode_tokens == list(range(first, first + len(decode_tokens)))
    token_index = slice(first, first + len(decode_tokens)) if contiguous else _long_tensor(decode_tokens, device)
    decode = _decode_group(
        token_index,
        [context_lens[i] for i in decode_seqs],
        [block_tables[i] for i in decode_seqs],
        block_size,
        num_kv_heads,
        dtype,
        device,
        with_gather=with_gather,
    )
    return decode, prefills, start


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on device. Packed by struct and wrapped without a copy: torch.tensor on a
    Python list converts element by element, ~80 ns each (a batch-64 block table: ~0.1 ms)."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    packed = torch.frombuffer(bytearray(struct.pack(f"{len(values)}q", *values)), dtype=torch.long)
    return packed if device.type == "cpu" else packed.to(device)


@functools.lru_cache(maxsize=64)
def _strided_range(count: int, step: int, device: torch.device) -> torch.Tensor:
    """int64 [count]: 0, step, 2 * step, ... (kept: the same few per model, every step). Never written to."""
    return torch.arange(count, device=device) * step


def _write_indices(
    slot_mapping: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    k_dim_major: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_mapping: [T] slots -> (write_rows [T * KV], k_write [T * KV] or dim-major [T * KV * D]).

    Slot s is offset o = s % block_size in block b = s // block_size, so b * block_size = s - o and
    V row (b * KV + h) * block_size + o = (s - o) * KV + o + h * block_size; dim-major K element
    ((b * KV + h) * D + d) * block_size + o = (s - o) * KV * D + o + (h * D + d) * block_size: a
    per-token base plus a per-(head, dim) constant."""
    slots = slot_mapping.to(device=device, dtype=torch.long)
    offset = slots % block_size
    start = slots - offset
    # [T, 1] + [KV] flattened token-major, as the pool's store wants.
    write_rows = (
        torch.add(offset, start, alpha=num_kv_heads)[:, None] + _strided_range(num_kv_heads, block_size, device)
    ).view(-1)
    if not k_dim_major:
        return write_rows, write_rows
    width = num_kv_heads * head_dim
    k_write = (torch.add(offset, start, alpha=width)[:, None] + _strided_range(width, block_size, device)).view(-1)
    return write_rows, k_write


def _decode_group(
    tokens: slice | torch.Tensor,
    lens: list[int],
    tables: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    with_gather: bool,
) -> DecodeGroup:
    """The decode sequences' group: lens, tables: theirs, in token order; tokens: where their tokens are."""
    num_seqs = len(lens)
    max_blocks = (max(lens) + block_size - 1) // block_size
    # Pad short tables with block 0: its rows are read but masked out.
    flat: list[int] = []
    for table in tables:
        if len(table) == max_blocks:
            flat += table
        else:
            row = table[:max_blocks]
            flat += row
            flat += [0] * (max_blocks - len(row))
    table_tensor = _long_tensor(flat, device).view(num_seqs, max_blocks)
    padded_len = max_blocks * block_size
    ctx = _long_tensor(lens, device)
    gather_rows = mask = None
    if with_gather:
        gather_rows = (
            table_tensor[:, None, :] * num_kv_heads + _strided_range(num_kv_heads, 1, device)[None, :, None]
        ).view(-1)
        hidden = _strided_range(padded_len, 1, device)[None, :] >= ctx[:, None]  # [B, Lp]: past the context
        # Materialized per KV head: [B * KV, 1, Lp], 0 inside the context, -inf past it.
        mask = torch.zeros(num_seqs, num_kv_heads, 1, padded_len, dtype=dtype, device=device)
        mask = mask.masked_fill_(hidden[:, None, None, :], float("-inf")).view(-1, 1, padded_len)
    return DecodeGroup(
        tokens=tokens,
        num_seqs=num_seqs,
        padded_len=padded_len,
        block_table=table_tensor,
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
        table = _long_tensor(padded_table, device)
        gather_rows = (table[None, :] * num_kv_heads + _strided_range(num_kv_heads, 1, device)[:, None]).view(-1)
    # Query i sits at position context_len - q_len + i and sees keys up to it;
    # that also hides the keys past context_len. Padding queries (i >= q_len) see
    # every key: their rows are thrown away, but must not be all -inf (NaN).
    # Key j is hidden from query i where j - i > context_len - q_len: the upper triangle from that diagonal.
    mask = torch.full((padded_queries, key_len), float("-inf"), dtype=dtype, device=device).triu_(
        context_len - q_len + 1
    )
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
        if meta.write_rows is None or meta.k_write is None:
            raise RuntimeError("attention metadata without write indices cannot store K/V")
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
