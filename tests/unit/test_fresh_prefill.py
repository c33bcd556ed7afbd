"""attention.FreshPrefill (a lone fresh prefill chunk's attention bound once per step) and
AttentionMetadata.fresh_prefill (which steps it serves), against paged_attention and the
forward without it: the same SDPA call on the same views, so bit for bit."""

from __future__ import annotations

import random
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.model.attention import FreshPrefill, paged_attention
from services.engine.model.attention_metadata import AttentionMetadata
from services.engine.model.batch import ForwardBatch
from services.engine.model.native import NativeKernels
from services.engine.model.plan import KernelPlan
from services.engine.model.runner import ModelRunner
from tests.unit.test_forward_fusion import CONFIG

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
# paged_attention only hands the kernels object to decodes; prefills never touch it.
NATIVE = cast(NativeKernels, object())

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta(query_lens: list[int], context_lens: list[int], dtype: torch.dtype) -> AttentionMetadata:
    """Metadata of a step over shuffled blocks, for a plan whose kernel stores K/V (bf16) or not (f32)."""
    tables, slots, free = [], [], random.Random(1).sample(range(24), 24)
    for q_len, ctx in zip(query_lens, context_lens, strict=True):
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - q_len, ctx)]
    plan = KernelPlan(dtype, dtype, dtype == torch.bfloat16, NATIVE, ())
    return AttentionMetadata.build(
        slot_mapping=torch.tensor(slots),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        block_size=BLOCK,
        num_kv_heads=KV_HEADS,
        head_dim=DIM,
        device=torch.device("cpu"),
        plan=plan,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens", [2, 16, 20, 128])
def test_fresh_prefill_equals_paged_attention(dtype: torch.dtype, tokens: int) -> None:
    """The fused qkv rows (with padding rows below, as the workspace has them), rebound when a
    second buffer comes: paged_attention's output bit for bit, as contiguous [T, H * D] rows."""
    meta = _meta([tokens], [tokens], dtype)
    assert meta.fresh_prefill() is meta.prefills[0]
    attention = FreshPrefill(tokens, HEADS, KV_HEADS, DIM, 0.125)
    gen = torch.Generator().manual_seed(tokens)
    pool = torch.zeros(24, KV_HEADS, BLOCK, DIM, dtype=dtype)
    for _ in range(2):
        qkv = torch.randn(tokens + 3, (HEADS + 2 * KV_HEADS) * DIM, generator=gen).to(dtype)
        rows = qkv[:tokens].view(tokens, HEADS + 2 * KV_HEADS, DIM)
        q, k, v = rows[:, :HEADS], rows[:, HEADS : HEADS + KV_HEADS], rows[:, HEADS + KV_HEADS :]
        want = paged_attention(q, k, v, pool.clone(), pool.clone(), meta, 0.125)
        got = attention(qkv)
        assert got.shape == (tokens, HEADS * DIM) and got.is_contiguous()
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "query_lens, context_lens",
    [
        ([19], [19]),  # padded to a 20-query bucket
        ([16], [40]),  # 24 tokens cached before the chunk
        ([16, 16], [16, 16]),  # two prompts
        ([16, 1], [16, 9]),  # a prompt beside a decode
        ([1, 1], [5, 9]),  # decodes only
    ],
    ids=["padded", "cached", "two-prompts", "with-decode", "decodes"],
)
def test_fresh_prefill_is_none_for_any_other_step(query_lens: list[int], context_lens: list[int]) -> None:
    assert _meta(query_lens, context_lens, torch.bfloat16).fresh_prefill() is None


# ---- the forward with and without it ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(98)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG, rope_theta=10000.0)).eval()
    path = tmp_path_factory.mktemp("smol-shaped-fresh")
    hf.save_pretrained(path)
    return path


def _runner(path: Path) -> ModelRunner:
    return ModelRunner(
        path,
        dtype="bfloat16",
        device="cpu",
        block_size=BLOCK,
        num_blocks=24,
        kv_cache_bytes=None,
        max_model_len=None,
        kernels="auto",
    )


@pytest.mark.parametrize("tokens, padding", [(20, 0), (20, 3), (128, 0)])
def test_forward_with_fresh_prefill_equals_the_forward_without(
    model_dir: Path, tokens: int, padding: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone prompt's step, then a decode after it: the same logits and the same pool, bit for bit.
    On SDPA's FreshPrefill (the native kernel, NativeFreshPrefill, is within bf16 rounding of it, not bit
    for bit: tests/unit/test_prefill_attention.py)."""
    ours, theirs = _runner(model_dir), _runner(model_dir)
    monkeypatch.setattr(ours.model, "_prefill_kernels", None)  # NativeFreshPrefill on SDPA
    if ours.plan.native_layers is None:
        pytest.skip("FreshPrefill serves the native layer kernels' steps, which do not build here")
    if ours.plan.compute_dtype != ours.plan.dtype:
        # Without native bf16 (e.g. AMD Zen 3) attention scores are float32 (the masks' dtype), which
        # paged_attention's own prefill computes; FreshPrefill's SDPA runs on the bf16 rows as stored.
        pytest.skip(f"FreshPrefill serves bf16-compute plans; this CPU computes bf16 in {ours.plan.compute_dtype}")
    rng = random.Random(tokens)
    ids = [rng.randrange(CONFIG["vocab_size"]) for _ in range(tokens + 1)]
    blocks = rng.sample(range(24), -(-(tokens + 1) // BLOCK))

    def batch(start: int, end: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=torch.tensor(ids[start:end]),
            positions=torch.arange(start, end),
            slot_mapping=torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]),
            query_lens=[end - start],
            context_lens=[end],
            block_tables=[blocks],
            logits_indices=torch.tensor([end - start - 1]),
        )

    def forward(runner: ModelRunner, step: ForwardBatch) -> torch.Tensor:
        with torch.inference_mode():
            return runner.model.forward(
                step.input_ids,
                step.positions,
                step.slot_mapping,
                step.logits_indices,
                runner.attention_metadata(step),
                runner.kv_cache,
                padded_rows=step.input_ids.shape[0] + padding,
            )

    calls: list[int] = []
    attend = FreshPrefill.__call__
    with monkeypatch.context() as patch:
        patch.setattr(FreshPrefill, "__call__", lambda self, qkv: calls.append(1) or attend(self, qkv))
        fresh = forward(ours, batch(0, tokens))
    assert len(calls) == CONFIG["num_hidden_layers"]  # every layer's attention took it
    with monkeypatch.context() as patch:
        patch.setattr(AttentionMetadata, "fresh_prefill", lambda self: None)
        assert torch.equal(fresh, forward(theirs, batch(0, tokens)))
        assert torch.equal(forward(ours, batch(tokens, tokens + 1)), forward(theirs, batch(tokens, tokens + 1)))
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))
