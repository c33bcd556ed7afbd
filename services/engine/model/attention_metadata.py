"""Per-step attention metadata: the batch's block tables turned into index tensors and masks.

``AttentionMetadata.build`` runs once per step; every layer's ``paged_attention``
(attention.py) reuses what it built. It builds only what the plan's kernels read:
with the native decode kernel, block tables and context lengths; on the torch
path, the gather rows and additive masks; write indices only where torch stores
the new K/V.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch

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

    def fresh_prefill(self) -> PrefillSeq | None:
        """The step's one sequence when the step is exactly one prefill chunk with nothing cached
        before it, at a length no bucket pads (attention.FreshPrefill computes that step's attention
        as paged_attention would); None for any other step."""
        if self.decode is not None or len(self.prefills) != 1:
            return None
        seq = self.prefills[0]
        chunk = seq.end - seq.start
        fresh = seq.gather_rows is None and seq.start == 0 and chunk == self.num_tokens
        return seq if fresh and seq.padded_queries == seq.padded_keys == chunk else None

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
