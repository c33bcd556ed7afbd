"""The kernel plan on CPUs this machine may not be: AVX2-only (AMD Zen 3), AVX-512 with
native bf16 (Zen 4), and the native kernels compiled for instruction sets below the host's."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from services.engine.model import native as native_module
from services.engine.model.cpu import CpuFeatures
from services.engine.model.kv_cache import (
    dequantize_int8,
    int8_chunk_bytes,
    quantize_int8,
    quantize_int8_pool,
    split_int8,
)
from services.engine.model.native import PATH_FLAGS, PATHS, pack_bf16_weight, path_for
from services.engine.model.plan import choose_plan
from services.engine.model.reference import reference_decode_attention

CPU = torch.device("cpu")
# /proc/cpuinfo flags as read on the project's two kinds of machine (abridged).
ZEN3_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 movbe abm"
ZEN4_FLAGS = ZEN3_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16"


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
    return path


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    zen3 = CpuFeatures.detect(cpuinfo(tmp_path, ZEN3_FLAGS))
    assert zen3.has("avx2", "fma") and not zen3.avx512 and not zen3.native_bf16
    assert "without avx512f" in zen3.describe() and zen3.describe().startswith("avx2 fma")
    assert CpuFeatures.detect(tmp_path / "missing").flags == frozenset()


def test_avx2_only_cpu_keeps_bfloat16_as_storage_and_computes_in_float32(tmp_path: Path) -> None:
    zen3 = CpuFeatures(CpuFeatures.detect(cpuinfo(tmp_path, ZEN3_FLAGS)).flags)
    assert not zen3.onednn_bf16
    plan = choose_plan("bfloat16", CPU, "torch", zen3)
    assert (plan.dtype, plan.compute_dtype, plan.prepacked_linears) == (torch.bfloat16, torch.float32, False)
    why = " ".join(plan.reasons)
    # The log names the missing CPU features.
    assert "avx512bw+avx512vl+avx512dq" in why and "avx_ne_convert" in why
    assert "bfloat16 weights computed in float32" in plan.describe()
    # auto: bf16 storage on every CPU (weights and KV cache), float32 arithmetic here.
    auto = choose_plan("auto", CPU, "torch", zen3)
    assert (auto.dtype, auto.compute_dtype) == (torch.bfloat16, torch.float32)
    assert "auto picked bfloat16 storage" in " ".join(auto.reasons)
    assert choose_plan("float32", CPU, "torch", zen3).dtype == torch.float32


def test_avx2_only_cpu_gets_the_avx2_kernels_and_the_native_bf16_linear(tmp_path: Path) -> None:
    if platform.machine() != "x86_64" or not CpuFeatures.detect().has(*PATH_FLAGS["avx2"]):
        pytest.skip(f"the avx2 kernels need {'+'.join(PATH_FLAGS['avx2'])} on an x86-64 CPU")
    zen3 = CpuFeatures(CpuFeatures.detect(cpuinfo(tmp_path, ZEN3_FLAGS)).flags)
    plan = choose_plan("auto", CPU, "native", zen3)
    assert plan.native is not None and plan.native.path == "avx2"
    assert plan.native_layers is plan.native and plan.native_linears is plan.native and plan.k_dim_major
    assert "native avx2 kernel" in plan.describe() and "native (avx2)" in plan.describe()
    # float32 stays the reference mode: torch's F.linear, native attention only.
    exact = choose_plan("float32", CPU, "native", zen3)
    assert exact.native_linears is None and exact.native_layers is None and exact.linear_kind == "torch F.linear"
    assert path_for(CpuFeatures.simulated("avx2")) == "portable"
    assert path_for(CpuFeatures.simulated(*ZEN4_FLAGS.split())) == "avx512"


def test_cpu_with_native_bf16_prepacks_for_onednn(tmp_path: Path) -> None:
    zen4 = CpuFeatures(CpuFeatures.detect(cpuinfo(tmp_path, ZEN4_FLAGS)).flags)
    plan = choose_plan("auto", CPU, "torch", zen4)
    assert (plan.dtype, plan.compute_dtype, plan.prepacked_linears) == (torch.bfloat16, torch.bfloat16, True)
    assert "avx512_bf16" in plan.reasons[0]


def test_avx_ne_convert_alone_is_enough_for_onednn() -> None:
    assert CpuFeatures.simulated("avx2", "fma", "avx_ne_convert").onednn_bf16


# -march targets below the host's, each with the flags a CPU needs to run its code.
MARCH_NEEDS = {"x86-64-v3": ("avx2", "fma", "bmi2", "f16c", "movbe"), "x86-64": ()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("march", list(MARCH_NEEDS))
def test_native_kernels_built_for_a_lower_instruction_set_match_torch(
    march: str, path: str, kernel_cache_dir: Path
) -> None:
    """The AVX2 and baseline builds of the kernels (what a Zen 3 runs), every path, checked on any x86 machine;
    each target compiled once (the session's kernel_cache_dir), then loaded for each path."""
    if platform.machine() != "x86_64":
        pytest.skip(f"-march={march} is an x86-64 target; this machine is {platform.machine()}")
    host = CpuFeatures.detect()
    missing = [flag for flag in (*MARCH_NEEDS[march], *PATH_FLAGS[path]) if flag not in host.flags]
    if missing:
        pytest.skip(f"-march={march} code on the {path} path needs {' '.join(missing)}, which this CPU lacks")
    library = native_module.build_and_check(march, kernel_cache_dir)  # with the self-check of every runnable path
    kernels = library.with_path(path)
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        for block_size in (16, 8, 4):
            k_cache = torch.randn(12, 3, 64, block_size, generator=gen).to(dtype)
            v_cache = torch.randn(12, 3, block_size, 64, generator=gen).to(dtype)
            q = torch.randn(3, 9, 64, generator=gen).to(dtype)
            table = torch.tensor([[5, 2, 11, 0], [7, 1, 0, 0], [3, 4, 6, 8]])
            lens = torch.tensor([4 * block_size - 3, block_size + 1, 4 * block_size])
            got = kernels.decode(q, k_cache, v_cache, table, lens, 0.125)
            want = reference_decode_attention(q, k_cache, v_cache, table, lens, 0.125, k_dim_major=True)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
            # The 8-bit KV cache (fp8 e5m2) on the same path: the reference reads the same values widened.
            k8, v8 = k_cache.to(torch.float8_e5m2), v_cache.to(torch.float8_e5m2)
            got = kernels.decode(q, k8, v8, table, lens, 0.125)
            want = reference_decode_attention(q, k8.float(), v8.float(), table, lens, 0.125, k_dim_major=True)
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
            # The int8 KV cache: the reference reads the dequantized values.
            ki, vi = quantize_int8_pool(k_cache, dim_major=True), quantize_int8_pool(v_cache, dim_major=False)
            got = kernels.decode(q, ki, vi, table, lens, 0.125)
            k_deq, v_deq = dequantize_int8(ki, 64, dim_major=True), dequantize_int8(vi, 64, dim_major=False)
            want = reference_decode_attention(q, k_deq, v_deq, table, lens, 0.125, k_dim_major=True)
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    weight = torch.randn(100, 576, generator=gen).to(torch.bfloat16)
    x = torch.randn(13, 576, generator=gen)
    got = kernels.linear(x, pack_bf16_weight(weight), 100)
    torch.testing.assert_close(got, x @ weight.float().T, atol=1e-3, rtol=1e-4)
    # The RoPE kernel's e5m2 K/V store: torch's rounding of the rotated bf16 k and of v, bit for bit.
    heads, kv_heads, dim, block = 3, 1, 72, 4
    qkv = torch.randn(9, (heads + 2 * kv_heads) * dim, generator=gen).mul(2.0**-12).to(torch.bfloat16)
    k8 = torch.zeros(4, kv_heads, dim, block, dtype=torch.float8_e5m2)
    v8 = torch.zeros(4, kv_heads, block, dim, dtype=torch.float8_e5m2)
    slots, angles = torch.randperm(16, generator=gen)[:9], torch.rand(9, dim // 2, generator=gen)
    kernels.rope_store(qkv, torch.arange(9), angles.cos(), angles.sin(), slots, k8, v8, heads)
    rows = qkv.view(9, -1, dim)  # k rotated in place
    stored_k = k8[slots // block, :, :, slots % block].view(torch.uint8)
    assert torch.equal(stored_k, rows[:, heads : heads + kv_heads].to(torch.float8_e5m2).view(torch.uint8))
    stored_v = v8[slots // block, :, slots % block].view(torch.uint8)
    assert torch.equal(stored_v, rows[:, heads + kv_heads :].to(torch.float8_e5m2).view(torch.uint8))
    # ... and the int8 store: kv_cache.quantize_int8 of the rotated bf16 k and of v, values and scales.
    ki = torch.zeros(4, kv_heads, int8_chunk_bytes(block, dim), dtype=torch.int8)
    vi = torch.zeros(4, kv_heads, int8_chunk_bytes(block, dim), dtype=torch.int8)
    qkv[2, heads * dim : (heads + kv_heads) * dim] = 0  # an all-zero k: scale 0
    kernels.rope_store(qkv, torch.arange(9), angles.cos(), angles.sin(), slots, ki, vi, heads)
    (k_values, k_scales), (v_values, v_scales) = split_int8(ki, dim), split_int8(vi, dim)
    blocks, offsets = slots // block, slots % block
    want_k, want_k_scales = quantize_int8(rows[:, heads : heads + kv_heads])
    want_v, want_v_scales = quantize_int8(rows[:, heads + kv_heads :])
    assert torch.equal(k_values.view(4, kv_heads, dim, block)[blocks, :, :, offsets], want_k)
    assert torch.equal(v_values.view(4, kv_heads, block, dim)[blocks, :, offsets], want_v)
    assert torch.equal(k_scales[blocks, :, offsets], want_k_scales) and want_k_scales[2].item() == 0
    assert torch.equal(v_scales[blocks, :, offsets], want_v_scales)
