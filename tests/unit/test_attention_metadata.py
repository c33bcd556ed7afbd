"""AttentionMetadata.build against the straightforward computation it replaced, on every kernel plan:
the same tensors (values, dtype, shape) wherever the plan's path reads them, and no write indices
where a native kernel stores the new K/V."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
import torch

from services.engine.model.attention_metadata import AttentionMetadata, DecodeGroup, PrefillSeq
from services.engine.model.native import NativeKernels
from services.engine.model.plan import KernelPlan
from services.engine.model.shapes import padded_attention_len

# build only passes the kernels object on; a stand-in keeps these tests free of a compiler.
NATIVE = cast(NativeKernels, object())
PLANS = {
    "torch-f32": KernelPlan(torch.float32, torch.float32, False, None, ()),
    "torch-bf16": KernelPlan(torch.bfloat16, torch.float32, False, None, ()),
    "native-f32": KernelPlan(torch.float32, torch.float32, False, NATIVE, ()),  # dim-major K, torch stores
    "native-bf16": KernelPlan(torch.bfloat16, torch.bfloat16, True, NATIVE, ()),  # RoPE kernel stores
    "native-bf16-fp8": KernelPlan(torch.bfloat16, torch.bfloat16, True, NATIVE, (), kv_dtype=torch.float8_e5m2),
}


def reference_build(
    slot_mapping: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    plan: KernelPlan,
) -> dict[str, Any]:
    """The previous AttentionMetadata.build, op for op (CPU), as a dict of its fields."""
    dtype = plan.compute_dtype
    heads = torch.arange(num_kv_heads)
    slots = slot_mapping.to(dtype=torch.long)
    block, offset = slots // block_size, slots % block_size
    write_rows = ((block[:, None] * num_kv_heads + heads[None, :]) * block_size + offset[:, None]).reshape(-1)
    k_write = write_rows
    if plan.k_dim_major and not plan.stores_kv_natively:
        dims = torch.arange(head_dim)
        base = (block[:, None] * num_kv_heads + heads[None, :]) * head_dim
        k_write = ((base[:, :, None] + dims[None, None, :]) * block_size + offset[:, None, None]).reshape(-1)
    decode_seqs: list[int] = []
    decode_tokens: list[int] = []
    prefills = []
    start = 0
    for i, q_len in enumerate(query_lens):
        if q_len == 1:
            decode_seqs.append(i)
            decode_tokens.append(start)
        else:
            prefills.append(
                reference_prefill(
                    start, q_len, context_lens[i], block_tables[i], block_size, num_kv_heads, heads, dtype
                )
            )
        start += q_len
    decode = None
    if decode_seqs:
        lens = [context_lens[i] for i in decode_seqs]
        max_blocks = (max(lens) + block_size - 1) // block_size
        table = torch.tensor(
            [
                block_tables[i][:max_blocks] + [0] * (max_blocks - len(block_tables[i][:max_blocks]))
                for i in decode_seqs
            ],
            dtype=torch.long,
        )
        padded_len = max_blocks * block_size
        ctx = torch.tensor(lens, dtype=torch.long)
        gather_rows = mask = None
        if plan.native is None:
            gather_rows = (table[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1)
            visible = torch.arange(padded_len)[None, :] < ctx[:, None]
            mask = torch.zeros(len(decode_seqs), padded_len, dtype=dtype).masked_fill_(~visible, float("-inf"))
            mask = mask[:, None, None, :].expand(len(decode_seqs), num_kv_heads, 1, padded_len)
            mask = mask.reshape(-1, 1, padded_len)
        first = decode_tokens[0]
        contiguous = decode_tokens == list(range(first, first + len(decode_tokens)))
        tokens = slice(first, first + len(decode_tokens)) if contiguous else torch.tensor(decode_tokens)
        decode = {
            "tokens": tokens,
            "num_seqs": len(decode_seqs),
            "padded_len": padded_len,
            "block_table": table,
            "context_lens": ctx,
            "gather_rows": gather_rows,
            "mask": mask,
        }
    return {
        "write_rows": write_rows,
        "k_write": k_write,
        "k_dim_major": plan.k_dim_major,
        "store_kv": not plan.stores_kv_natively,
        "decode": decode,
        "prefills": prefills,
        "num_tokens": start,
    }


def reference_prefill(
    start: int,
    q_len: int,
    context_len: int,
    block_table: list[int],
    block_size: int,
    num_kv_heads: int,
    heads: torch.Tensor,
    dtype: torch.dtype,
) -> dict[str, Any]:
    gather_rows = None
    padded_queries = padded_attention_len(q_len)
    key_len = padded_queries
    if context_len != q_len:
        num_blocks = (context_len + block_size - 1) // block_size
        key_len = padded_attention_len(num_blocks * block_size, block_size)
        padded_table = block_table[:num_blocks] + [0] * (key_len // block_size - num_blocks)
        table = torch.tensor(padded_table, dtype=torch.long)
        gather_rows = (table[None, :] * num_kv_heads + heads[:, None]).reshape(-1)
    query_pos = torch.arange(context_len - q_len, context_len - q_len + padded_queries)
    visible = torch.arange(key_len)[None, :] <= query_pos[:, None]
    mask = torch.zeros(padded_queries, key_len, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return {
        "start": start,
        "end": start + q_len,
        "context_len": context_len,
        "padded_queries": padded_queries,
        "padded_keys": key_len,
        "gather_rows": gather_rows,
        "mask": mask,
    }


def same_tensor(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return (
        got.dtype == want.dtype
        and got.shape == want.shape
        and got.is_contiguous()
        and torch.equal(got, want)
        and got.device == want.device
    )


def same_group(got: DecodeGroup | PrefillSeq, want: dict[str, Any]) -> None:
    for name, value in want.items():
        mine = getattr(got, name)
        if isinstance(value, torch.Tensor) or value is None:
            assert same_tensor(mine, value), name
        else:
            assert mine == value, name


def random_batch(
    seed: int, query_lens: list[int], cached: list[int], block_size: int, extra_blocks: int
) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Slots, context lens and shuffled block tables (some with blocks past their context) for a step."""
    rng = random.Random(seed)
    contexts = [c + q for c, q in zip(cached, query_lens, strict=True)]
    counts = [-(-n // block_size) + rng.randint(0, extra_blocks) for n in contexts]
    ids = list(range(sum(counts) + 4))
    rng.shuffle(ids)
    tables = []
    for count in counts:
        tables.append(ids[:count])
        ids = ids[count:]
    slots = [
        table[pos // block_size] * block_size + pos % block_size
        for table, c, q in zip(tables, cached, query_lens, strict=True)
        for pos in range(c, c + q)
    ]
    return torch.tensor(slots, dtype=torch.long), contexts, tables


# (query_lens, cached tokens before each): decode-only steps (the engine's usual), mixed, prefill-only.
BATCHES = {
    "decode-1": ([1], [299]),
    "decode-64": ([1] * 64, [random.Random(3).randint(0, 400) for _ in range(64)]),
    "decode-uneven": ([1, 1, 1], [0, 15, 16]),
    "mixed-split-decodes": ([5, 1, 7, 1, 1], [0, 40, 20, 3, 0]),
    "decodes-then-prefill": ([1, 1, 18], [10, 33, 23]),
    "prefill-fresh": ([19], [0]),
    "prefill-cached": ([9], [9]),
    "empty": ([], []),
}


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("block_size", [16, 4])
def test_build_matches_the_previous_computation(plan_name: str, batch_name: str, block_size: int) -> None:
    plan = PLANS[plan_name]
    query_lens, cached = BATCHES[batch_name]
    kv_heads, head_dim = 3, 8
    slots, contexts, tables = random_batch(len(query_lens), query_lens, cached, block_size, extra_blocks=2)
    meta = AttentionMetadata.build(
        slot_mapping=slots,
        query_lens=query_lens,
        context_lens=contexts,
        block_tables=tables,
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        device=torch.device("cpu"),
        plan=plan,
    )
    want = reference_build(slots, query_lens, contexts, tables, block_size, kv_heads, head_dim, plan)
    assert meta.store_kv == want["store_kv"] and meta.k_dim_major == want["k_dim_major"]
    assert meta.num_tokens == want["num_tokens"] and meta.native is plan.native
    if meta.store_kv:
        assert same_tensor(meta.write_rows, want["write_rows"]) and same_tensor(meta.k_write, want["k_write"])
        if not meta.k_dim_major:
            assert meta.k_write is meta.write_rows
    else:  # the native RoPE kernel stores K/V: nothing reads write indices, none are built
        assert meta.write_rows is None and meta.k_write is None
    if want["decode"] is None:
        assert meta.decode is None
    else:
        assert meta.decode is not None
        wanted_tokens = want["decode"].pop("tokens")
        if isinstance(wanted_tokens, slice):
            assert meta.decode.tokens == wanted_tokens
        else:
            assert isinstance(meta.decode.tokens, torch.Tensor) and same_tensor(meta.decode.tokens, wanted_tokens)
        same_group(meta.decode, want["decode"])
    assert len(meta.prefills) == len(want["prefills"])
    for got, wanted in zip(meta.prefills, want["prefills"], strict=True):
        same_group(got, wanted)


def test_build_in_and_out_of_inference_mode_share_cached_ranges() -> None:
    """The kept aranges may be made under inference_mode (the runner) and used outside it (tests), or the reverse."""
    plan = PLANS["torch-f32"]
    slots, contexts, tables = random_batch(0, [1, 1], [30, 2], 16, extra_blocks=0)
    args: dict[str, Any] = {
        "slot_mapping": slots,
        "query_lens": [1, 1],
        "context_lens": contexts,
        "block_tables": tables,
        "block_size": 16,
        "num_kv_heads": 2,
        "head_dim": 8,
        "device": torch.device("cpu"),
        "plan": plan,
    }
    with torch.inference_mode():
        inside = AttentionMetadata.build(**args)
    outside = AttentionMetadata.build(**args)
    assert outside.decode is not None and inside.decode is not None
    assert same_tensor(outside.decode.mask, inside.decode.mask)
    assert same_tensor(outside.write_rows, inside.write_rows)
