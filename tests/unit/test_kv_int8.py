"""The int8 KV cache (SCALELLM_KV_CACHE_DTYPE=int8): the quantization (kv_cache.quantize_int8), the
native decode on an int8 pool on every path this CPU runs against the reference on the dequantized
values, the native and torch stores bit for bit against the torch quantization, the prefill gather,
the setting and the plan's refusals, the pool's size, and a tiny model's forward with int8 KV against
the same model with bf16 KV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from services.engine.model.attention import paged_attention
from services.engine.model.attention_metadata import AttentionMetadata
from services.engine.model.cpu import CpuFeatures
from services.engine.model.kv_cache import (
    dequantize_int8,
    int8_chunk_bytes,
    kv_bytes_per_block,
    quantize_int8,
    quantize_int8_pool,
    split_int8,
)
from services.engine.model.native import PATH_FLAGS, PATHS, NativeKernels, load_native_kernels
from services.engine.model.plan import KernelPlan, choose_plan
from services.engine.model.reference import reference_decode_attention
from shared.settings import EngineSettings, load_settings
from tests.unit.test_attention import CASES, FAST_CASES, FAST_IDS, random_case, torch_threads
from tests.unit.test_kv_fp8 import BLOCK, edge_values, runner_for
from tests.unit.test_model_runner import AVX2_ONLY, Pool, Seq, prompt

I8 = torch.int8
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=PATHS)
def kernel(request: pytest.FixtureRequest) -> NativeKernels:
    """The kernels bound to each code path; a path this CPU cannot run is skipped, naming its flags."""
    loaded = load_native_kernels("native")
    assert loaded is not None
    path: str = request.param
    if path not in loaded.runnable_paths():
        missing = [flag for flag in PATH_FLAGS[path] if flag not in CpuFeatures.detect().flags]
        pytest.skip(f"the {path} kernels need {' '.join(missing or PATH_FLAGS[path])}, which this CPU lacks")
    return loaded.with_path(path)


def int8_pools(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(K chunks, V chunks, K dequantized, V dequantized) of a float pool (K dim-major)."""
    head_dim = v_cache.shape[-1]
    k8, v8 = quantize_int8_pool(k_cache, dim_major=True), quantize_int8_pool(v_cache, dim_major=False)
    return k8, v8, dequantize_int8(k8, head_dim, dim_major=True), dequantize_int8(v8, head_dim, dim_major=False)


# ---- the quantization ----


def test_quantize_int8_is_symmetric_absmax_with_round_to_nearest() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=gen) * torch.logspace(-30, 30, 50)[:, None]
    x[3] = 0  # all zeros: scale 0, zeros, no NaN
    x[4] = -0.0
    x[5, 7] = 1e-30  # absmax below 2^-64: stored as zeros too
    x[5, 8:] = 0
    x[5, :7] = 0
    q, scale = quantize_int8(x)
    assert q.dtype == I8 and scale.dtype == torch.float32 and scale.shape == (50,)
    assert not scale.isnan().any() and q.abs().max() <= 127
    assert scale[3] == scale[4] == scale[5] == 0 and not q[3:6].any()
    live = scale > 0
    # The largest magnitude of every vector maps to +-127; the rest round to nearest.
    assert (q[live].abs().amax(-1) == 127).all()
    error = (q.float() * scale[:, None] - x).abs()
    assert (error[live] <= scale[live, None] * 0.5 * (1 + 1e-5)).all()
    # Ties go to even, as torch.round: 2.5 steps -> 2, 3.5 -> 4.
    tie = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5]])
    q, scale = quantize_int8(tie)
    assert scale.item() == pytest.approx(1.0) and q.tolist() == [[127, 2, 4, -2, 0]]


def test_int8_chunks_round_trip_through_the_pool_layout() -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 16, 4, generator=gen)  # [blocks, KV, D, block_size]
    v = torch.randn(3, 2, 4, 16, generator=gen)
    k8, v8 = quantize_int8_pool(k, dim_major=True), quantize_int8_pool(v, dim_major=False)
    assert k8.shape == v8.shape == (3, 2, int8_chunk_bytes(4, 16)) == (3, 2, 80)
    values, scales = split_int8(k8, 16)
    q, want_scales = quantize_int8(k.transpose(-1, -2))
    assert torch.equal(scales, want_scales) and torch.equal(values.view(3, 2, 16, 4), q.transpose(-1, -2))
    torch.testing.assert_close(dequantize_int8(k8, 16, dim_major=True), k, atol=0.02, rtol=0)
    torch.testing.assert_close(dequantize_int8(v8, 16, dim_major=False), v, atol=0.02, rtol=0)


# ---- the decode kernel ----


@pytest.mark.parametrize("case", CASES, ids=["gqa3-d64", "mha-d128", "mqa-d32", "d24-scalar", "g5-bs32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32-q", "bf16-q"])
def test_decode_on_an_int8_pool_matches_the_reference_on_the_dequantized_values(
    kernel: NativeKernels, case: dict[str, Any], dtype: torch.dtype
) -> None:
    q, k_cache, v_cache, table, lens = random_case(7, dtype=dtype, k_dim_major=True, **case)
    k8, v8, k_deq, v_deq = int8_pools(k_cache.float(), v_cache.float())
    got = kernel.decode(q, k8, v8, table, lens, 0.1)
    assert got.dtype == dtype
    want = reference_decode_attention(q, k_deq, v_deq, table, lens, 0.1, k_dim_major=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("case", FAST_CASES, ids=FAST_IDS)
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32-q", "bf16-q"])
def test_int8_pool_block16_matches_reference_on_any_thread_count(
    kernel: NativeKernels, case: dict[str, Any], threads: int, dtype: torch.dtype
) -> None:
    """AVX-512's code for block size 16 (test_attention.FAST_CASES), here on int8 chunks and their scales."""
    q, k_cache, v_cache, table, lens = random_case(threads, dtype=dtype, k_dim_major=True, **case)
    k8, v8, k_deq, v_deq = int8_pools(k_cache.float(), v_cache.float())
    with torch_threads(threads):
        got = kernel.decode(q, k8, v8, table, lens, 0.1)
    want = reference_decode_attention(q, k_deq, v_deq, table, lens, 0.1, k_dim_major=True)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # both round a float32 result to bf16: at most one bf16 step apart
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2**-7)


def test_decode_refuses_an_int8_pool_of_another_head_dim(kernel: NativeKernels) -> None:
    q = torch.zeros(1, 2, 16)
    pool = torch.zeros(2, 1, int8_chunk_bytes(4, 32), dtype=I8)  # a head_dim 32 pool's chunks, q of 16
    with pytest.raises(ValueError, match="int8 pool"):
        kernel.decode(q, pool, pool, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)


# ---- the stores ----


def store_case(values: torch.Tensor, heads: int, kv_heads: int, dim: int, block: int) -> dict[str, Any]:
    """qkv rows holding values as k (and reversed as v), zero q, and an int8 pool with room for them."""
    tokens = -(-values.numel() // (kv_heads * dim))
    kv = torch.zeros(tokens * kv_heads * dim * 2, dtype=torch.bfloat16)
    kv[: values.numel()] = values
    kv[tokens * kv_heads * dim : tokens * kv_heads * dim + values.numel()] = values.flip(0)
    k_new, v_new = kv.view(2, tokens, kv_heads, dim)
    qkv = torch.cat([torch.zeros(tokens, heads * dim, dtype=torch.bfloat16), k_new.flatten(1), v_new.flatten(1)], 1)
    num_blocks = -(-tokens // block) + 1
    return {
        "qkv": qkv.contiguous(),
        "tokens": tokens,
        "k8": torch.full((num_blocks, kv_heads, int8_chunk_bytes(block, dim)), 55, dtype=I8),  # garbage
        "v8": torch.full((num_blocks, kv_heads, int8_chunk_bytes(block, dim)), 55, dtype=I8),
        "slots": torch.randperm(num_blocks * block, generator=torch.Generator().manual_seed(1))[:tokens],
    }


def stored(k8: torch.Tensor, v8: torch.Tensor, slots: torch.Tensor, dim: int, block: int) -> tuple[torch.Tensor, ...]:
    """The int8 values and scales at slots: k [T, KV, D], k scales [T, KV], v, v scales."""
    (k_values, k_scales), (v_values, v_scales) = split_int8(k8, dim), split_int8(v8, dim)
    blocks, offsets = slots // block, slots % block
    k_values = k_values.reshape(*k8.shape[:2], dim, block)[blocks, :, :, offsets]
    v_values = v_values.reshape(*v8.shape[:2], block, dim)[blocks, :, offsets]
    return k_values, k_scales[blocks, :, offsets], v_values, v_scales[blocks, :, offsets]


@pytest.mark.parametrize("dim", [72, 64], ids=["d72-tail", "d64"])
def test_rope_store_quantizes_exactly_as_torch(kernel: NativeKernels, dim: int) -> None:
    """cos 1, sin 0: the rotation keeps k, so the pool must hold exactly quantize_int8(k) and
    quantize_int8(v), values and scales, for vectors of every magnitude, zeros included."""
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, block = 2, 2, 8
    vectors = torch.randn(40, dim, generator=gen) * torch.logspace(-25, 25, 40)[:, None]
    vectors[5] = 0  # all zero: scale 0, no NaN
    vectors[6, :] = 0
    vectors[6, 3] = 1e-21  # below 2^-64: zeros too
    vectors[7] = torch.arange(dim) - dim / 2 + 0.5  # ties after scaling
    values = torch.cat([vectors.flatten().to(torch.bfloat16), edge_values().clamp(-1e30, 1e30)])
    values = values[values.isfinite()]
    case = store_case(values, heads, kv_heads, dim, block)
    qkv, tokens, k8, v8, slots = (case[name] for name in ("qkv", "tokens", "k8", "v8", "slots"))
    positions = torch.zeros(tokens, dtype=torch.long)
    kernel.rope_store(qkv, positions, torch.ones(1, dim // 2), torch.zeros(1, dim // 2), slots, k8, v8, heads)
    rows = qkv.view(tokens, -1, dim)  # k as the kernel left it in qkv
    k_values, k_scales, v_values, v_scales = stored(k8, v8, slots, dim, block)
    want_k, want_k_scales = quantize_int8(rows[:, heads : heads + kv_heads])
    want_v, want_v_scales = quantize_int8(rows[:, heads + kv_heads :])
    assert torch.equal(k_values, want_k) and torch.equal(v_values, want_v)
    assert torch.equal(k_scales.view(torch.int32), want_k_scales.view(torch.int32))
    assert torch.equal(v_scales.view(torch.int32), want_v_scales.view(torch.int32))
    assert (k_scales == 0).any() and not k_scales.isnan().any()


def test_rope_store_decode_on_an_int8_pool_matches_its_parts(kernel: NativeKernels) -> None:
    """The fused store + decode (a decode-only step's one call per layer) on int8: as rope_store, then decode."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    k_cache = torch.randn(20, kv_heads, dim, block, generator=gen)
    v_cache = torch.randn(20, kv_heads, block, dim, generator=gen)
    k8, v8, _, _ = int8_pools(k_cache, v_cache)
    table = torch.randperm(20, generator=gen)[:18].view(3, 6)
    lens = torch.tensor([90, 17, 33])
    slots = torch.tensor([int(table[b, (n - 1) // block]) * block + (n - 1) % block for b, n in enumerate(lens)])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen).to(torch.bfloat16)
    angles = torch.rand(100, dim // 2, generator=gen)
    args = (lens - 1, angles.cos(), angles.sin(), slots)
    k_a, v_a, qkv_a = k8.clone(), v8.clone(), qkv.clone()
    got = kernel.rope_store_decode(qkv_a, *args, k_a, v_a, heads, table, lens, 0.125)
    kernel.rope_store(qkv, *args, k8, v8, heads)
    want = kernel.decode(qkv.view(3, -1, dim)[:, :heads], k8, v8, table, lens, 0.125)
    assert torch.equal(k_a, k8) and torch.equal(v_a, v8) and torch.equal(got, want)


def int8_plan(native: NativeKernels | None, dtype: torch.dtype = torch.float32) -> KernelPlan:
    """float32 (torch stores the new K/V, quantized) or bf16, with an int8 pool."""
    return KernelPlan(dtype, dtype, False, native, (), kv_dtype=I8)


def test_torch_store_and_native_decode_on_an_int8_pool(kernel: NativeKernels) -> None:
    """float32 model, int8 pool: paged_attention stores the new K/V quantized (quantize_int8, dim-major
    K), the native kernel reads them back."""
    case = CASES[0]
    q, k_cache, v_cache, table, lens = random_case(11, dtype=torch.float32, k_dim_major=True, **case)
    k8, v8, _, _ = int8_pools(k_cache, v_cache)
    block_size, dim = case["block_size"], case["head_dim"]
    new_k = torch.randn(len(lens), case["kv_heads"], dim)
    new_v = torch.randn(len(lens), case["kv_heads"], dim)
    new_v[1, 0] = 0  # an all-zero vector
    slots = torch.tensor(
        [int(table[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size for b, n in enumerate(lens.tolist())]
    )
    meta = AttentionMetadata.build(
        slot_mapping=slots,
        query_lens=[1] * len(lens),
        context_lens=lens.tolist(),
        block_tables=[row.tolist() for row in table],
        block_size=block_size,
        num_kv_heads=case["kv_heads"],
        head_dim=dim,
        device=CPU,
        plan=int8_plan(kernel),
    )
    got = paged_attention(q, new_k, new_v, k8, v8, meta, 0.125)
    k_values, k_scales, v_values, v_scales = stored(k8, v8, slots, dim, block_size)
    want_k, want_k_scales = quantize_int8(new_k)
    want_v, want_v_scales = quantize_int8(new_v)
    assert torch.equal(k_values, want_k) and torch.equal(k_scales, want_k_scales)
    assert torch.equal(v_values, want_v) and torch.equal(v_scales, want_v_scales) and v_scales[1, 0] == 0
    k_deq, v_deq = dequantize_int8(k8, dim, dim_major=True), dequantize_int8(v8, dim, dim_major=False)
    want = reference_decode_attention(q, k_deq, v_deq, table, lens, 0.125, k_dim_major=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cached, chunk", [(9, 7), (23, 18)], ids=["exact", "padded"])
def test_prefill_after_a_cached_prefix_reads_the_int8_pool(kernel: NativeKernels, cached: int, chunk: int) -> None:
    """The chunked-prefill / prefix-cache path gathers the int8 chunks (dim-major K) and dequantizes
    them: the same as SDPA over the quantized keys and values (the chunk's own too, stored first)."""
    heads, kv_heads, dim, block = 6, 2, 16, 4
    gen = torch.Generator().manual_seed(5)
    garbage = torch.randn(16, kv_heads, dim, block, generator=gen), torch.randn(16, kv_heads, block, dim, generator=gen)
    k8, v8, _, _ = int8_pools(*garbage)  # garbage where nothing was stored
    table = torch.randperm(16, generator=gen)[: -(-(cached + chunk) // block)].tolist()
    all_k = torch.randn(cached + chunk, kv_heads, dim, generator=gen)
    all_v = torch.randn(cached + chunk, kv_heads, dim, generator=gen)
    q = torch.randn(cached + chunk, heads, dim, generator=gen)
    slots = [table[p // block] * block + p % block for p in range(cached + chunk)]
    # The prefix, stored as an earlier step would (torch's store; a chunk of its own).
    first = AttentionMetadata.build(
        slot_mapping=torch.tensor(slots[:cached]),
        query_lens=[cached],
        context_lens=[cached],
        block_tables=[table],
        block_size=block,
        num_kv_heads=kv_heads,
        head_dim=dim,
        device=CPU,
        plan=int8_plan(kernel),
    )
    paged_attention(q[:cached], all_k[:cached], all_v[:cached], k8, v8, first, 0.25)
    meta = AttentionMetadata.build(
        slot_mapping=torch.tensor(slots[cached:]),
        query_lens=[chunk],
        context_lens=[cached + chunk],
        block_tables=[table],
        block_size=block,
        num_kv_heads=kv_heads,
        head_dim=dim,
        device=CPU,
        plan=int8_plan(kernel),
    )
    got = paged_attention(q[cached:], all_k[cached:], all_v[cached:], k8, v8, meta, 0.25)
    visible = torch.arange(cached + chunk)[None, :] <= torch.arange(cached, cached + chunk)[:, None]
    (k_q, k_s), (v_q, v_s) = quantize_int8(all_k), quantize_int8(all_v)
    rounded_k, rounded_v = k_q.float() * k_s[..., None], v_q.float() * v_s[..., None]
    want = F.scaled_dot_product_attention(
        q[cached:].transpose(0, 1),
        rounded_k.transpose(0, 1).repeat_interleave(3, dim=0),
        rounded_v.transpose(0, 1).repeat_interleave(3, dim=0),
        attn_mask=visible,
        scale=0.25,
    )
    torch.testing.assert_close(got, want.transpose(0, 1).reshape(chunk, -1), atol=1e-5, rtol=1e-5)


# ---- the setting ----


def test_int8_needs_the_native_kernels_on_the_cpu_and_names_both_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SCALELLM_KV_CACHE_DTYPE=int8.*SCALELLM_KERNELS.*torch"):
        choose_plan("bfloat16", CPU, "torch", kernel_cache_dir=tmp_path, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="SCALELLM_KV_CACHE_DTYPE=int8.*SCALELLM_DEVICE=cpu \\(here cuda\\)"):
        choose_plan("auto", torch.device("cuda"), "auto", kernel_cache_dir=tmp_path, kv_cache_dtype="int8")


def test_the_plan_keeps_the_int8_format_and_says_so() -> None:
    plan = choose_plan("bfloat16", CPU, "native", kv_cache_dtype="int8")
    assert plan.kv_cache_dtype == I8 and plan.dtype == torch.bfloat16 and plan.stores_kv_natively
    assert plan.describe().endswith("KV cache int8")  # the heartbeat's / metric's kernels string
    assert "KV cache int8: one byte per K/V value and a float32 scale per token and KV head" in " ".join(plan.reasons)
    # float32 with int8 is allowed: torch stores (quantizing as the kernels do), the native kernel reads.
    exact = choose_plan("float32", CPU, "native", kv_cache_dtype="int8")
    assert exact.kv_cache_dtype == I8 and not exact.stores_kv_natively


def test_auto_is_int8_for_bf16_on_the_native_kernels_and_the_model_dtype_elsewhere(kernel_cache_dir: Path) -> None:
    for cpu in (None, AVX2_ONLY):
        if cpu is not None and not CpuFeatures.detect().has(*PATH_FLAGS["avx2"]):
            continue
        plan = choose_plan("bfloat16", CPU, "native", cpu, kernel_cache_dir=kernel_cache_dir)
        assert plan.kv_cache_dtype == I8 and plan.describe().endswith("KV cache int8")
        assert "KV cache auto picked int8: within 0.1% of bf16 KV's perplexity" in " ".join(plan.reasons)
    # float32 is the reference mode; the torch kernels cannot read int8.
    exact = choose_plan("float32", CPU, "native", kernel_cache_dir=kernel_cache_dir)
    assert exact.kv_cache_dtype == torch.float32 and "reference mode" in " ".join(exact.reasons)
    plain = choose_plan("bfloat16", CPU, "torch", kernel_cache_dir=kernel_cache_dir)
    assert plain.kv_cache_dtype == torch.bfloat16 and "native kernels, which are not in use" in " ".join(plain.reasons)
    assert choose_plan("auto", CPU, "native", kernel_cache_dir=kernel_cache_dir).kv_cache_dtype == I8  # auto is bf16


def test_bfloat16_names_a_bf16_models_unquantized_cache(kernel_cache_dir: Path) -> None:
    for kernels in ("native", "torch"):
        plan = choose_plan("bfloat16", CPU, kernels, kernel_cache_dir=kernel_cache_dir, kv_cache_dtype="bfloat16")
        assert plan.kv_dtype is None and plan.kv_cache_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="SCALELLM_KV_CACHE_DTYPE=bfloat16.*float32"):
        choose_plan("float32", CPU, "native", kv_cache_dtype="bfloat16")


def test_without_native_kernels_int8_keeps_the_kv_cache_in_the_model_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.engine.model import native as native_module

    native_module._load_once.cache_clear()
    monkeypatch.setenv("CC", "/bin/false")
    try:
        plan = choose_plan("bfloat16", CPU, "auto", kernel_cache_dir=tmp_path, kv_cache_dtype="int8")
    finally:
        native_module._load_once.cache_clear()
    assert plan.native is None and plan.kv_cache_dtype == torch.bfloat16
    assert "KV cache int8 requested, but the native kernels failed" in " ".join(plan.reasons)


def test_the_setting_takes_int8_and_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("int8", "bfloat16"):
        monkeypatch.setenv("SCALELLM_KV_CACHE_DTYPE", value)
        assert load_settings(EngineSettings).kv_cache_dtype == value


# ---- the runner: pool size, end to end ----

# The runners: test_kv_fp8's, on conftest's tiny_llama.


def test_the_same_memory_holds_nearly_twice_the_blocks(tiny_llama: Path) -> None:
    budget = 1 << 20
    bf16 = runner_for(tiny_llama, "bfloat16", num_blocks=None, kv_cache_bytes=budget)
    int8 = runner_for(tiny_llama, "int8", num_blocks=None, kv_cache_bytes=budget)
    cfg = int8.config
    dim = cfg.head_dim  # 16 here: (16 + 4) / 32 of bf16's bytes
    assert int8.kv_bytes_per_block() * 2 * dim == bf16.kv_bytes_per_block() * (dim + 4)
    assert int8.num_blocks == budget // int8.kv_bytes_per_block() > bf16.num_blocks
    k_cache, v_cache = int8.kv_cache.layer(0)
    assert k_cache.dtype == v_cache.dtype == I8 and k_cache.shape == (int8.num_blocks, cfg.num_kv_heads, 20 * BLOCK)
    pool_bytes = 2 * int8.kv_cache.k.numel()  # K and V, values and scales
    assert pool_bytes == int8.num_blocks * kv_bytes_per_block(
        num_layers=cfg.num_layers, block_size=BLOCK, num_kv_heads=cfg.num_kv_heads, head_dim=dim, dtype=I8
    )


@pytest.mark.parametrize(
    "dtype, cpu", [("bfloat16", None), ("bfloat16", AVX2_ONLY), ("float32", None)], ids=["bf16", "bf16-avx2", "f32"]
)
def test_forward_with_int8_kv_stays_close_to_the_model_dtypes_kv(
    tiny_llama: Path, dtype: str, cpu: CpuFeatures | None
) -> None:
    """Decodes, a chunk after a cached prefix and a fresh prefill, then decode-only steps (the fused
    store + attention), so that most of the context comes from the pool: logits with int8 KV near
    those with the model dtype's KV, and nearer than with fp8 e5m2 KV."""
    if cpu is not None and not CpuFeatures.detect().has(*PATH_FLAGS["avx2"]):
        pytest.skip(f"the avx2 kernels need {'+'.join(PATH_FLAGS['avx2'])}, which this CPU lacks")
    unquantized = "bfloat16" if dtype == "bfloat16" else "auto"
    runners = [runner_for(tiny_llama, kv, dtype, cpu=cpu) for kv in (unquantized, "int8", "fp8_e5m2")]
    assert runners[1].kv_cache.k.dtype == I8 and runners[1].plan.stores_kv_natively == (dtype == "bfloat16")
    outputs = []
    for runner in runners:
        pool = Pool(seed=40)
        decode, chunked, fresh = Seq(prompt(9, seed=41)), Seq(prompt(14, seed=42)), Seq(prompt(5, seed=43))
        runner.forward(pool.schedule([(decode, 8), (chunked, 6)])[0])
        steps = [runner.forward(pool.schedule([(decode, 1), (chunked, 8), (fresh, 5)])[0])]
        for token in range(4):
            decode.tokens.append(token)
            chunked.tokens.append(token)
            fresh.tokens.append(token)
            steps.append(runner.forward(pool.schedule([(decode, 1), (chunked, 1), (fresh, 1)])[0]))
        outputs.append(torch.cat(steps))
    reference, int8, fp8 = outputs
    # int8 with a scale per vector rounds each value by at most 1/254 of its vector's largest; broken
    # loads, stores or scales (a wrong byte, slot or scale) move the logits by far more; none would be 0.
    error = (int8 - reference).abs().max().item()
    assert 0 < error < 0.02, error
    # Observed: max 0.0013 (float32) to 0.0078 (bf16: one bf16 step of the logits), mean 0.0003-0.0006,
    # against fp8 e5m2's max 0.015, mean 0.0027.
    assert (int8 - reference).abs().mean() < (fp8 - reference).abs().mean() / 3
    assert (int8.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
