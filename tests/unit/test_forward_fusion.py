"""The native forward's per-step binding (layer_step.LayerStep, llama.py's workspace) and
its fused RoPE + KV store + decode attention kernel, against the unfused ops they replace:
bit for bit, since they run the same kernels on the same inputs.

Every kernel path this CPU runs is checked (portable, AVX2, AVX-512); the model-level tests
plan for this CPU, an AVX2-only one and one without vector extensions (each binding that path).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.model.attention import paged_attention
from services.engine.model.batch import ForwardBatch
from services.engine.model.cpu import CpuFeatures
from services.engine.model.layer_step import LayerStep
from services.engine.model.native import NativeKernels, load_native_kernels
from services.engine.model.runner import ModelRunner

BLOCK = 16
NUM_BLOCKS = 48
# The kernel tests' pool: 3 blocks for each of up to 40 sequences.
POOL_BLOCKS = 120
# SmolLM2-135M's attention shape (9 query / 3 KV heads of 64), two small layers.
CONFIG = {
    "vocab_size": 256,
    "hidden_size": 576,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
AVX2_ONLY = CpuFeatures.simulated("avx", "avx2", "fma", "f16c", "bmi2", "movbe")

# Small ops on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def native() -> NativeKernels:
    kernels = load_native_kernels("auto")
    if kernels is None:
        pytest.skip("the native kernels do not build or pass their self-check here")
    return kernels


def _pool(dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers of K (dim-major) and V, random."""
    k = torch.randn(2, POOL_BLOCKS, 3, 64, BLOCK, generator=gen).to(dtype)
    v = torch.randn(2, POOL_BLOCKS, 3, BLOCK, 64, generator=gen).to(dtype)
    return k, v


def _decode_inputs(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """qkv [T, 15 * 64], positions, slots, block tables [T, 3], context lengths: each sequence's
    own shuffled blocks, its new token at position context - 1."""
    blocks = torch.randperm(POOL_BLOCKS, generator=gen)[: 3 * tokens].view(tokens, 3)
    context = torch.randint(1, 3 * BLOCK + 1, (tokens,), generator=gen)
    positions = context - 1
    slots = blocks.gather(1, (positions // BLOCK)[:, None])[:, 0] * BLOCK + positions % BLOCK
    qkv = torch.randn(tokens, 15 * 64, generator=gen).to(torch.bfloat16)
    return qkv, positions, slots, blocks.contiguous(), context


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float8_e5m2])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_rope_store_decode_equals_rope_store_then_decode(
    native: NativeKernels, pool_dtype: torch.dtype, tokens: int
) -> None:
    """40 tokens: the OpenMP loop of rope_store (and its K-line prefetch across a thread's tokens)."""
    angles = torch.rand(64, 32, generator=torch.Generator().manual_seed(1)) * 6
    cos, sin = angles.cos(), angles.sin()
    for path in native.runnable_paths():
        kernels = native.with_path(path)
        gen = torch.Generator().manual_seed(tokens)
        qkv, positions, slots, table, context = _decode_inputs(tokens, gen)
        k, v = _pool(pool_dtype, gen)
        k_want, v_want, qkv_want = k[0].clone(), v[0].clone(), qkv.clone()
        kernels.rope_store(qkv_want, positions, cos, sin, slots, k_want, v_want, 9)
        want = kernels.decode(qkv_want[:, : 9 * 64].view(tokens, 9, 64), k_want, v_want, table, context, 0.125)
        got = kernels.rope_store_decode(qkv, positions, cos, sin, slots, k[0], v[0], 9, table, context, 0.125)
        assert torch.equal(got, want), path
        assert torch.equal(qkv, qkv_want), path
        assert torch.equal(k[0].view(torch.uint8), k_want.view(torch.uint8)), path
        assert torch.equal(v[0].view(torch.uint8), v_want.view(torch.uint8)), path


@pytest.mark.parametrize("rows,tokens", [(1, 1), (7, 7), (40, 33)])
def test_layer_step_equals_the_checked_kernels(native: NativeKernels, rows: int, tokens: int) -> None:
    """norm, silu_mul, rope_store and rope_attend of a bound step, on its second layer's pool,
    against the checked one-call-per-op fronts; padding rows (rows > tokens) stay out of the pool."""
    angles = torch.rand(64, 32, generator=torch.Generator().manual_seed(2)) * 6
    cos, sin = angles.cos(), angles.sin()
    for path in native.runnable_paths():
        kernels = native.with_path(path)
        gen = torch.Generator().manual_seed(rows)
        qkv, positions, slots, table, context = _decode_inputs(tokens, gen)
        qkv = torch.cat([qkv, torch.randn(rows - tokens, qkv.shape[1], generator=gen).to(torch.bfloat16)])
        k, v = _pool(torch.bfloat16, gen)
        x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
        weight = torch.randn(576, generator=gen).to(torch.bfloat16)
        gate_up = torch.randn(rows, 384, generator=gen).to(torch.bfloat16)
        step = LayerStep(
            kernels,
            tokens=tokens,
            normed=torch.empty(rows, 576, dtype=torch.bfloat16),
            activated=torch.empty(rows, 192, dtype=torch.bfloat16),
            positions=positions,
            cos=cos,
            sin=sin,
            slots=slots,
            k_pool=k,
            v_pool=v,
            num_heads=9,
            eps=1e-5,
            decode=(table, context, torch.empty(tokens, 9 * 64, dtype=torch.bfloat16), 0.125),
        )
        assert torch.equal(step.norm(x, weight), kernels.rms_norm(x, weight, 1e-5)), path
        assert torch.equal(step.silu_mul(gate_up), kernels.silu_mul(gate_up)), path

        k_want, v_want, qkv_want = k[1].clone(), v[1].clone(), qkv[:tokens].clone()
        kernels.rope_store(qkv_want, positions, cos, sin, slots, k_want, v_want, 9)
        stored = qkv.clone()
        step.rope_store(1, stored)
        assert torch.equal(stored[:tokens], qkv_want) and torch.equal(stored[tokens:], qkv[tokens:]), path
        assert torch.equal(k[1], k_want) and torch.equal(v[1], v_want), path

        fresh_k, fresh_v = _pool(torch.bfloat16, gen)
        k[1], v[1] = fresh_k[1], fresh_v[1]
        k0, v0 = k[0].clone(), v[0].clone()
        k_want, v_want = k[1].clone(), v[1].clone()
        want = kernels.rope_store_decode(
            qkv[:tokens].clone(), positions, cos, sin, slots, k_want, v_want, 9, table, context, 0.125
        )
        assert torch.equal(step.rope_attend(1, qkv.clone()), want), path
        assert torch.equal(k[1], k_want) and torch.equal(v[1], v_want), path
        assert torch.equal(k[0], k0) and torch.equal(v[0], v0), path  # the other layer untouched


def test_layer_step_without_decode_refuses_rope_attend(native: NativeKernels) -> None:
    k, v = _pool(torch.bfloat16, torch.Generator().manual_seed(3))
    step = LayerStep(
        native,
        tokens=1,
        normed=torch.empty(1, 576, dtype=torch.bfloat16),
        activated=torch.empty(1, 192, dtype=torch.bfloat16),
        positions=torch.tensor([0]),
        cos=torch.ones(4, 32),
        sin=torch.zeros(4, 32),
        slots=torch.tensor([0]),
        k_pool=k,
        v_pool=v,
        num_heads=9,
        eps=1e-5,
    )
    with pytest.raises(RuntimeError, match="not built for decode"):
        step.rope_attend(0, torch.zeros(1, 15 * 64, dtype=torch.bfloat16))


# ---- the whole forward against the one-call-per-op forward it replaced ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(99)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG, rope_theta=10000.0)).eval()
    path = tmp_path_factory.mktemp("smol-shaped")
    hf.save_pretrained(path)
    return path


def _runner(path: Path, cpu: CpuFeatures | None, kv_cache_dtype: str) -> ModelRunner:
    return ModelRunner(
        path,
        dtype="bfloat16",
        device="cpu",
        block_size=BLOCK,
        num_blocks=NUM_BLOCKS,
        kv_cache_bytes=None,
        max_model_len=None,
        kernels="native",
        cpu=cpu,
        kv_cache_dtype=kv_cache_dtype,
    )


def unfused_forward(runner: ModelRunner, batch: ForwardBatch) -> torch.Tensor:
    """ModelRunner.forward as it was before the step binding: every native kernel through its
    checked front, RoPE + store and attention as two calls, a fresh tensor per op."""
    model, cfg = runner.model, runner.config
    native = model.native_layers
    assert native is not None
    meta = runner.attention_metadata(batch)
    num_tokens = batch.input_ids.shape[0]
    padding = runner._padded_rows(num_tokens) - num_tokens
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qk_size = (heads + kv_heads) * head_dim
    hidden = F.embedding(F.pad(batch.input_ids, (0, padding)), model.embed)  # type: ignore[arg-type]
    attn_rows = hidden.new_zeros(num_tokens + padding, heads * head_dim) if padding else None
    eps = cfg.rms_norm_eps
    for index, layer in enumerate(model.layers):
        qkv = layer.qkv(native.rms_norm(hidden, layer.input_norm, eps))[:num_tokens]
        k_cache, v_cache = runner.kv_cache.layer(index)
        native.rope_store(
            qkv, batch.positions, model.rotary.cos, model.rotary.sin, batch.slot_mapping, k_cache, v_cache, heads
        )
        qk = qkv[:, :qk_size].view(num_tokens, heads + kv_heads, head_dim)
        v = qkv[:, qk_size:].view(num_tokens, kv_heads, head_dim)
        attn = paged_attention(qk[:, :heads], qk[:, heads:], v, k_cache, v_cache, meta, model.scale)
        if attn_rows is not None:
            attn_rows[:num_tokens] = attn
            attn = attn_rows
        hidden = layer.o.add_to(hidden, attn)
        gate_up = layer.gate_up(native.rms_norm(hidden, layer.post_norm, eps))
        hidden = layer.down.add_to(hidden, native.silu_mul(gate_up))
    last = hidden.index_select(0, batch.logits_indices)
    return model.lm_head(native.rms_norm(last, model.final_norm, eps)).float()


def _batch(seqs: list[tuple[list[int], list[int], int, int]]) -> ForwardBatch:
    """(tokens, blocks, cached, new) per sequence -> the step computing `new` tokens after `cached`."""
    ids, positions, slots = [], [], []
    for tokens, blocks, cached, new in seqs:
        for pos in range(cached, cached + new):
            ids.append(tokens[pos])
            positions.append(pos)
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
    last, end = [], 0
    for _, _, _, new in seqs:
        end += new
        last.append(end - 1)
    return ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_lens=[new for *_, new in seqs],
        context_lens=[cached + new for _, _, cached, new in seqs],
        block_tables=[blocks for _, blocks, _, _ in seqs],
        logits_indices=torch.tensor(last),
    )


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e5m2"])
@pytest.mark.parametrize("cpu_name", ["this CPU", "avx2-only", "no vector extensions"])
def test_forward_equals_the_unfused_forward(model_dir: Path, cpu_name: str, kv_cache_dtype: str) -> None:
    """Prefills (73 tokens: padded to 80 rows where the plan pads), a mixed step, then decodes
    alone (the fused RoPE + attention kernel): the same logits and the same pool, bit for bit."""
    cpu = {"this CPU": None, "avx2-only": AVX2_ONLY, "no vector extensions": CpuFeatures.simulated()}[cpu_name]
    ours, theirs = _runner(model_dir, cpu, kv_cache_dtype), _runner(model_dir, cpu, kv_cache_dtype)
    assert ours.plan.native_layers is not None
    rng = random.Random(5)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    lengths = (73, 20, 3)
    seqs = [([rng.randrange(256) for _ in range(n + 4)], [free.pop() for _ in range(6)]) for n in lengths]
    steps = [
        [(*seqs[0], 0, 73)],
        [(*seqs[0], 73, 1), (*seqs[1], 0, 20), (*seqs[2], 0, 3)],
        *([(*seqs[0], 74 + i, 1), (*seqs[1], 20 + i, 1), (*seqs[2], 3 + i, 1)] for i in range(3)),
        [(*seqs[2], 6, 1)],
    ]
    for step in steps:
        batch = _batch(step)
        with torch.inference_mode():
            want = unfused_forward(theirs, batch)
        assert torch.equal(ours.forward(batch), want)
    assert torch.equal(ours.kv_cache.k.view(torch.uint8), theirs.kv_cache.k.view(torch.uint8))
    assert torch.equal(ours.kv_cache.v.view(torch.uint8), theirs.kv_cache.v.view(torch.uint8))
