"""The native CPU kernels and the torch attention path against plain references."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from services.engine.model import linear as linear_module
from services.engine.model import native as native_module
from services.engine.model.attention import paged_attention
from services.engine.model.attention_metadata import AttentionMetadata
from services.engine.model.cpu import CpuFeatures
from services.engine.model.linear import Bf16Linear, ConversionBuffer
from services.engine.model.native import PATH_FLAGS, PATHS, NativeKernels, load_native_kernels, pack_bf16_weight
from services.engine.model.plan import KernelPlan
from services.engine.model.reference import apply_rope, reference_decode_attention, rms_norm


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


def random_case(
    seed: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    lens: list[int],
    dtype: torch.dtype,
    k_dim_major: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool with shuffled block tables; returns q [B, H, D], k/v caches, table [B, max_blocks], lens [B]."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    max_blocks = max(blocks_per_seq)
    table = []
    for count in blocks_per_seq:
        row, ids = ids[:count], ids[count:]
        table.append(row + [0] * (max_blocks - count))
    k_shape = (
        (num_blocks, kv_heads, head_dim, block_size) if k_dim_major else (num_blocks, kv_heads, block_size, head_dim)
    )
    k_cache = torch.randn(k_shape, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, torch.tensor(table), torch.tensor(lens)


def float32_plan(native: NativeKernels | None) -> KernelPlan:
    """float32 throughout: the native decode kernel (dim-major K) or torch; torch stores new K/V either way."""
    return KernelPlan(torch.float32, torch.float32, False, native, ())


CASES: list[dict[str, Any]] = [
    {"heads": 9, "kv_heads": 3, "head_dim": 64, "block_size": 16, "lens": [1, 16, 17, 300]},
    {"heads": 4, "kv_heads": 4, "head_dim": 128, "block_size": 4, "lens": [5, 2, 33]},
    {"heads": 8, "kv_heads": 1, "head_dim": 32, "block_size": 8, "lens": [64, 7]},  # group of 8: two passes of 4
    {"heads": 6, "kv_heads": 2, "head_dim": 24, "block_size": 32, "lens": [40, 3]},  # head_dim % 16: scalar path
    {"heads": 10, "kv_heads": 2, "head_dim": 16, "block_size": 32, "lens": [70, 33, 1]},  # group of 5: 4 + 1
]

# Block size 16 and head_dim % 32 == 0 with a bf16 pool: AVX-512's own code (one 64-byte load holds two
# dims of K); more of its shapes in FAST_CASES below.
B16_CASES: list[dict[str, Any]] = [
    {"heads": 16, "kv_heads": 2, "head_dim": 96, "block_size": 16, "lens": [49, 15, 2]},  # group of 8; 64 + 32 dims
    {"heads": 2, "kv_heads": 1, "head_dim": 32, "block_size": 16, "lens": [33, 1, 16, 100, 7]},  # items > threads
]


@pytest.mark.parametrize(
    "case",
    CASES + B16_CASES,
    ids=["gqa3-d64", "mha-d128", "mqa-d32", "d24-scalar", "g5-bs32", "g8-d96-bs16", "g2-d32-bs16"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_native_kernel_matches_reference(kernel: NativeKernels, case: dict[str, Any], dtype: torch.dtype) -> None:
    q, k_cache, v_cache, table, lens = random_case(7, dtype=dtype, k_dim_major=True, **case)
    got = kernel.decode(q, k_cache, v_cache, table, lens, 0.1)
    want = reference_decode_attention(q, k_cache, v_cache, table, lens, 0.1, k_dim_major=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


# AVX-512's code for block size 16 (a bf16 or e5m2 pool, head_dim % 32 == 0): a work item is a whole
# sequence, its blocks outside and its KV heads inside, or a few of its KV heads when there are under
# ~4 sequences a thread. Shapes for its loops: KV heads 1..6, groups 1..8 (5 and 7: chunks of 4 and a
# rest), contexts of 1 and off multiples of 16, 32 dims after 64, very uneven contexts; the tests run
# them on 1, 2 and 5 threads (more threads than sequences, and items of unequal head counts).
FAST_CASES: list[dict[str, Any]] = [
    {"heads": 1, "kv_heads": 1, "head_dim": 64, "block_size": 16, "lens": [1]},
    {"heads": 4, "kv_heads": 2, "head_dim": 32, "block_size": 16, "lens": [17, 1, 40]},
    {"heads": 9, "kv_heads": 3, "head_dim": 64, "block_size": 16, "lens": [300, 5, 1, 33, 16, 250, 7, 100, 64, 2]},
    {"heads": 20, "kv_heads": 4, "head_dim": 96, "block_size": 16, "lens": [49, 15]},
    {"heads": 42, "kv_heads": 6, "head_dim": 64, "block_size": 16, "lens": [3, 31, 90]},
    {"heads": 16, "kv_heads": 2, "head_dim": 128, "block_size": 16, "lens": [1000, 1, 2, 3, 900, 4, 5, 6, 7, 8]},
    {"heads": 6, "kv_heads": 6, "head_dim": 32, "block_size": 16, "lens": [16, 32] * 12},
]
FAST_IDS = ["mha1-ctx1", "g2-kv2-d32", "gqa3-engine", "g5-kv4-d96", "g7-kv6", "g8-uneven-d128", "mha6-24seqs"]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` OpenMP threads. torch loads its libgomp.so.1 first and the kernels' library
    binds to that same runtime, so torch's setting is the kernels' thread count too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("case", FAST_CASES, ids=FAST_IDS)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_bf16_pool_block16_matches_reference_on_any_thread_count(
    kernel: NativeKernels, case: dict[str, Any], threads: int
) -> None:
    q, k_cache, v_cache, table, lens = random_case(threads, dtype=torch.bfloat16, k_dim_major=True, **case)
    with torch_threads(threads):
        got = kernel.decode(q, k_cache, v_cache, table, lens, 0.1)
    want = reference_decode_attention(q, k_cache, v_cache, table, lens, 0.1, k_dim_major=True)
    # Both round a float32 result to bf16: at most one bf16 step apart (2^-7 relative).
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e5m2], ids=["bf16", "e5m2"])
def test_decode_of_no_sequences_returns_an_empty_batch(kernel: NativeKernels, dtype: torch.dtype) -> None:
    """Nothing to share out between the threads (the block-16 code divides by the sequence count)."""
    k_cache = torch.zeros(2, 3, 64, 16).to(dtype)
    v_cache = torch.zeros(2, 3, 16, 64).to(dtype)
    q = torch.zeros(0, 9, 64, dtype=torch.bfloat16)
    got = kernel.decode(q, k_cache, v_cache, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0.1)
    assert got.shape == (0, 9 * 64)


@pytest.mark.parametrize("use_native", [False, True], ids=["torch", "native"])
def test_paged_attention_decode_batch_matches_reference(kernel: NativeKernels, use_native: bool) -> None:
    """Through paged_attention: new K/V are written at their slots, then every sequence attends."""
    case = CASES[0]
    q, k_cache, v_cache, table, lens = random_case(11, dtype=torch.float32, k_dim_major=use_native, **case)
    block_size = case["block_size"]
    new_k = torch.randn(len(lens), case["kv_heads"], case["head_dim"])
    new_v = torch.randn(len(lens), case["kv_heads"], case["head_dim"])
    slots = [
        int(table[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size for b, n in enumerate(lens.tolist())
    ]
    meta = AttentionMetadata.build(
        slot_mapping=torch.tensor(slots),
        query_lens=[1] * len(lens),
        context_lens=lens.tolist(),
        block_tables=[row.tolist() for row in table],
        block_size=block_size,
        num_kv_heads=case["kv_heads"],
        head_dim=case["head_dim"],
        device=torch.device("cpu"),
        plan=float32_plan(kernel if use_native else None),
    )
    got = paged_attention(q, new_k, new_v, k_cache, v_cache, meta, 0.125)
    for b, slot in enumerate(slots):  # the new tokens landed in the pool
        block, offset = slot // block_size, slot % block_size
        stored = k_cache[block, :, :, offset] if use_native else k_cache[block, :, offset]
        torch.testing.assert_close(stored, new_k[b])
        torch.testing.assert_close(v_cache[block, :, offset], new_v[b])
    want = reference_decode_attention(q, k_cache, v_cache, table, lens, 0.125, k_dim_major=use_native)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh_cache_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty kernel cache folder, and no kernels loaded in this process yet."""
    native_module._load_once.cache_clear()
    yield tmp_path
    native_module._load_once.cache_clear()


def test_without_a_compiler_auto_falls_back_and_native_refuses(
    fresh_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING):
        assert load_native_kernels("auto", fresh_cache_dir) is None
    assert "using plain torch" in caplog.text
    with pytest.raises(RuntimeError, match="native kernels requested but unavailable"):
        load_native_kernels("native", fresh_cache_dir)
    assert load_native_kernels("torch", fresh_cache_dir) is None
    with pytest.raises(ValueError, match="'flash'"):
        load_native_kernels("flash", fresh_cache_dir)


def test_native_layer_kernels_match_torch_at_engine_sizes(kernel: NativeKernels) -> None:
    """Sizes large enough to take the kernels' multi-threaded branches."""
    gen = torch.Generator().manual_seed(3)
    bf16 = torch.bfloat16
    x = torch.randn(64, 1536, generator=gen).to(bf16)
    weight = torch.randn(1536, generator=gen).to(bf16)
    torch.testing.assert_close(kernel.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), atol=3e-2, rtol=1e-2)

    gate_up = torch.randn(64, 2 * 1536, generator=gen).to(bf16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(kernel.silu_mul(gate_up).float(), F.silu(gate) * up, atol=3e-2, rtol=1e-2)

    tokens, heads, kv_heads, dim, block = 40, 9, 3, 64, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(bf16)
    angles = torch.rand(512, dim // 2, generator=gen) * 6
    positions = torch.randperm(512, generator=gen)[:tokens]
    slots = torch.randperm(8 * block, generator=gen)[:tokens]
    k_cache = torch.zeros(8, kv_heads, dim, block, dtype=bf16)
    v_cache = torch.zeros(8, kv_heads, block, dim, dtype=bf16)
    qk = qkv[:, : (heads + kv_heads) * dim].float().view(tokens, -1, dim)
    rotated = apply_rope(qk, angles.cos()[positions][:, None], angles.sin()[positions][:, None])
    values = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim).clone()
    kernel.rope_store(qkv, positions, angles.cos(), angles.sin(), slots, k_cache, v_cache, heads)
    torch.testing.assert_close(
        qkv[:, : (heads + kv_heads) * dim].view(tokens, -1, dim).float(), rotated, atol=3e-2, rtol=1e-2
    )
    stored_k = k_cache[slots // block, :, :, slots % block]  # [tokens, kv_heads, dim]
    torch.testing.assert_close(stored_k.float(), rotated[:, heads:], atol=3e-2, rtol=1e-2)
    assert torch.equal(v_cache[slots // block, :, slots % block], values)


# Widths through every branch of the vector code: 64 and 32 lanes at a time (even / odd
# halves), 16 at a time, and a scalar tail; 3 rows single-threaded, 96 multi-threaded.
@pytest.mark.parametrize("width", [1536, 80, 48, 40, 8])
@pytest.mark.parametrize("rows", [3, 96])
def test_rms_norm_and_silu_mul_match_torch_at_every_width(kernel: NativeKernels, width: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(width + rows)
    x = (torch.randn(rows, width, generator=gen) * 3).to(torch.bfloat16)
    weight = torch.randn(width, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(kernel.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), atol=3e-2, rtol=1e-2)
    # strided rows: the norm reads them in place
    wide = torch.randn(rows, width + 16, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(
        kernel.rms_norm(wide[:, :width], weight, 1e-5), rms_norm(wide[:, :width], weight, 1e-5), atol=3e-2, rtol=1e-2
    )
    gate_up = (torch.randn(rows, 2 * width, generator=gen) * 4).to(torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(kernel.silu_mul(gate_up).float(), F.silu(gate) * up, atol=3e-2, rtol=1e-2)


def test_silu_mul_saturates_without_nan(kernel: NativeKernels) -> None:
    """Far out on both sides exp(-x) over- and underflows: silu is 0 and x there."""
    gate = torch.tensor([-1e30, -200.0, -90.0, -88.0, -20.0, 0.0, 20.0, 88.0, 90.0, 200.0, 1e30] * 3)
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None].to(torch.bfloat16).repeat(2, 1)
    got = kernel.silu_mul(gate_up).float()
    want = F.silu(gate_up[:, : gate.numel()].float())
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("head_dim", [64, 128, 48], ids=["d64", "d128", "d48"])
def test_rope_store_matches_torch_at_every_head_size(kernel: NativeKernels, head_dim: int) -> None:
    """64 and 128: the AVX-512 code's 32-pair steps (one and two per half); 48: the AVX2 code on every vector path."""
    gen = torch.Generator().manual_seed(head_dim)
    tokens, heads, kv_heads, block = 20, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(torch.bfloat16)
    angles = torch.rand(64, head_dim // 2, generator=gen) * 6
    positions = torch.randperm(64, generator=gen)[:tokens]
    slots = torch.randperm(4 * block, generator=gen)[:tokens]
    k_cache = torch.zeros(4, kv_heads, head_dim, block, dtype=torch.bfloat16)
    v_cache = torch.zeros(4, kv_heads, block, head_dim, dtype=torch.bfloat16)
    qk = qkv[:, : (heads + kv_heads) * head_dim].float().view(tokens, -1, head_dim)
    rotated = apply_rope(qk, angles.cos()[positions][:, None], angles.sin()[positions][:, None])
    values = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim).clone()
    kernel.rope_store(qkv, positions, angles.cos(), angles.sin(), slots, k_cache, v_cache, heads)
    got = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim).float()
    torch.testing.assert_close(got, rotated, atol=3e-2, rtol=1e-2)
    assert torch.equal(
        k_cache[slots // block, :, :, slots % block], qkv.view(tokens, -1, head_dim)[:, heads : heads + kv_heads]
    )
    assert torch.equal(v_cache[slots // block, :, slots % block], values)


# (cached, chunk): shapes as they are; queries and keys padded to attention buckets
# (18 queries -> 20, 41 keys -> 48: padding blocks of block 0); a fresh prefill padded.
@pytest.mark.parametrize("cached, chunk", [(9, 7), (23, 18), (0, 19)], ids=["exact", "padded", "fresh-padded"])
def test_prefill_chunk_after_cached_prefix_matches_sdpa(cached: int, chunk: int) -> None:
    heads, kv_heads, dim, block = 6, 2, 16, 4
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(16, kv_heads, block, dim, generator=gen)  # garbage where nothing was stored
    v_cache = torch.randn(16, kv_heads, block, dim, generator=gen)
    table = torch.randperm(16, generator=gen)[: -(-(cached + chunk) // block)].tolist()
    all_k = torch.randn(cached + chunk, kv_heads, dim, generator=gen)
    all_v = torch.randn(cached + chunk, kv_heads, dim, generator=gen)
    for pos in range(cached):  # the prefix is already in the pool
        k_cache[table[pos // block], :, pos % block] = all_k[pos]
        v_cache[table[pos // block], :, pos % block] = all_v[pos]
    q = torch.randn(chunk, heads, dim, generator=gen)
    slots = [table[p // block] * block + p % block for p in range(cached, cached + chunk)]
    meta = AttentionMetadata.build(
        slot_mapping=torch.tensor(slots),
        query_lens=[chunk],
        context_lens=[cached + chunk],
        block_tables=[table],
        block_size=block,
        num_kv_heads=kv_heads,
        head_dim=dim,
        device=torch.device("cpu"),
        plan=float32_plan(None),
    )
    got = paged_attention(q, all_k[cached:], all_v[cached:], k_cache, v_cache, meta, 0.25)
    visible = torch.arange(cached + chunk)[None, :] <= torch.arange(cached, cached + chunk)[:, None]
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        all_k.transpose(0, 1).repeat_interleave(3, dim=0),
        all_v.transpose(0, 1).repeat_interleave(3, dim=0),
        attn_mask=visible,
        scale=0.25,
    )
    torch.testing.assert_close(got, want.transpose(0, 1).reshape(chunk, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 6, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bf16_linear_matches_float32_matmul(kernel: NativeKernels, rows: int, dtype: torch.dtype) -> None:
    """bf16 weights x float32 / bf16 activations: every row tile, a partial last panel, bias,
    residual, strided rows; the float32 reference multiplies the same bf16 weights."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=gen).to(torch.bfloat16)  # 12.5 panels
    bias = torch.randn(200, generator=gen)
    wide = torch.randn(rows, 128, generator=gen).to(dtype)
    x = wide[:, :96]  # rows strided by 128
    residual = torch.randn(rows, 200, generator=gen).to(dtype)
    packed = pack_bf16_weight(weight)
    want = x.double() @ weight.double().T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    got = kernel.linear(x, packed, 200)
    assert got.dtype == dtype and got.shape == (rows, 200)
    torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=tol, rtol=tol)
    got = kernel.linear(x, packed, 200, bias, residual)
    torch.testing.assert_close(
        got.double(), (want + bias.double() + residual.double()).to(dtype).double(), atol=tol * 4, rtol=tol
    )
    assert torch.equal(kernel.unpack_into(packed, 200, torch.empty(200 * 96)), weight.float())


@pytest.mark.parametrize("rows", [3, linear_module.NATIVE_BF16_MAX_ROWS + 5], ids=["native", "widened"])
def test_bf16_linear_layer_takes_the_native_kernel_or_widens_for_many_rows(kernel: NativeKernels, rows: int) -> None:
    """Bf16Linear as the model calls it (bf16 activations): both branches, with bias and residual."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16)
    layer = Bf16Linear(weight, bias, kernel, ConversionBuffer(torch.float32))
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    residual = torch.randn(rows, 40, generator=gen).to(torch.bfloat16)
    want = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(layer(x).double(), want, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(layer.add_to(residual, x).double(), want + residual.double(), atol=6e-2, rtol=2e-2)
