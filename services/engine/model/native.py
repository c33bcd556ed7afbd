"""Optional native CPU kernels (csrc/*.c): paged decode attention, fused layer steps, bf16 linears.

Plain torch has no "attend over these scattered blocks" op, so the torch path
gathers every decode sequence's K/V into a padded copy each layer; at 64
sequences that copy costs about as much as all the matmuls. The C kernel reads
the pool in place. The bfloat16 layer kernels (RMSNorm, RoPE + KV store,
SiLU-and-multiply) replace 3-12 small torch ops each, whose dispatch cost is a
large share of a decode step at this model size. The bf16 linear multiplies
bf16 weights on CPUs without bf16 arithmetic (AVX2 + FMA), widening them in
registers, where torch would need a float32 copy of every weight per call.

One library holds every code path (AVX-512, AVX2 + FMA, portable C; csrc/simd.h);
a ``NativeKernels`` is bound to one, chosen from the CPU's flags (``path_for``)
by the kernel plan, so an AVX-512 machine can run and test what an AVX2 one runs.

They are compiled on first use with the system C compiler (a few seconds,
cached per source and CPU), loaded with ctypes (which releases the GIL), and
every path this CPU runs is checked against torch on small inputs before they
are trusted. Without a compiler, or if anything fails, the engine logs why and
uses plain torch.

SCALELLM_KERNELS=torch turns them off; =native makes their absence an error
(the setting reaches here through the kernel plan, plan.py). Compiled kernels
are kept in SCALELLM_KERNEL_CACHE_DIR (default: default_cache_dir()).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from services.engine.model.kv_cache import dequantize_int8, quantize_int8, quantize_int8_pool, split_int8
from services.engine.model.native_build import (
    DEFAULT_MARCH,
    KERNEL_CHOICES,
    PATH_FLAGS,
    PATHS,
    KernelChoice,
    _build,
    _declare,
    _resolve_cache_dir,
    default_cache_dir,
    path_for,
)
from services.engine.model.native_kernels import NativeKernels, pack_bf16_weight
from services.engine.model.reference import apply_rope, reference_decode_attention, rms_norm, silu_mul

# Callers import these from here (plan.py, linear.py, attention.py, quant_kernels.py, bench/, tests/).
__all__ = [
    "KERNEL_CHOICES",
    "PATHS",
    "PATH_FLAGS",
    "KernelChoice",
    "NativeKernels",
    "_build",
    "_declare",
    "_resolve_cache_dir",
    "build_and_check",
    "default_cache_dir",
    "load_native_kernels",
    "pack_bf16_weight",
    "path_for",
]

log = logging.getLogger(__name__)


def load_native_kernels(
    choice: str, cache_dir: str | Path | None = None, path: str | None = None
) -> NativeKernels | None:
    """The kernels for choice "auto" / "native", None for "torch" or when "auto" cannot have them.

    cache_dir: where compiled kernels are kept (None: default_cache_dir()); path: the
    code path to bind (``PATHS``; None: the fastest this CPU runs). A path this CPU
    cannot run is lowered to the fastest it can (planning for another CPU)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels choice {choice!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch":
        return None
    native = _load_once(_resolve_cache_dir(cache_dir))
    if isinstance(native, Exception):
        if choice == "native":
            raise RuntimeError(f"native kernels requested but unavailable: {native}") from native
        log.warning("native kernels unavailable, using plain torch: %s", native)
        return None
    runnable = native.runnable_paths()
    wanted = path or runnable[-1]
    if wanted not in runnable:
        lower = [p for p in runnable if PATHS.index(p) < PATHS.index(wanted)]
        log.warning("this CPU cannot run the %s kernels; using %s", wanted, lower[-1])
        wanted = lower[-1]
    return native.with_path(wanted)


@functools.cache
def _load_once(cache_dir: Path) -> NativeKernels | Exception:
    """Build, load and check once per process (and cache folder); the failure is kept to be reported."""
    try:
        return build_and_check(DEFAULT_MARCH, cache_dir)
    except Exception as exc:  # noqa: BLE001 - any failure only costs speed; the caller reports it
        return exc


def build_and_check(march: str, cache_dir: str | Path | None = None) -> NativeKernels:
    """Compile for ``-march=<march>`` (cached in cache_dir), load, and compare every path
    this CPU runs with torch; raises on any failure. Bound to the portable path."""
    native = NativeKernels(ctypes.CDLL(str(_build(march, _resolve_cache_dir(cache_dir)))))
    for path in native.runnable_paths():
        _self_check(native.with_path(path))
    return native


def _self_check(native: NativeKernels) -> None:
    """Compare every kernel of native's path with plain torch on small random inputs (reference.py)."""
    gen = torch.Generator().manual_seed(0)

    def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            raise RuntimeError(
                f"self-check of {name} ({native.path} path) failed: max error {(got.float() - want.float()).abs().max()}"
            )

    # Block size 4 takes the portable code on every path; 16 and 8 the vector code.
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for block_size, lens in ((4, [11, 3]), (16, [37, 16]), (8, [21, 1])):
            k_cache = torch.randn(8, 2, 64, block_size, generator=gen).to(dtype)
            v_cache = torch.randn(8, 2, block_size, 64, generator=gen).to(dtype)
            q = torch.randn(2, 6, 64, generator=gen).to(dtype)
            table = torch.tensor([[4, 1, 5], [2, 0, 0]])
            got = native.decode(q, k_cache, v_cache, table, torch.tensor(lens), 0.125)
            want = reference_decode_attention(q, k_cache, v_cache, table, torch.tensor(lens), 0.125, k_dim_major=True)
            check(f"decode attention ({dtype}, block size {block_size})", got, want, tol)
            # The 8-bit pool: the reference reads the same e5m2 values, widened.
            k8, v8 = k_cache.to(torch.float8_e5m2), v_cache.to(torch.float8_e5m2)
            got = native.decode(q, k8, v8, table, torch.tensor(lens), 0.125)
            want = reference_decode_attention(
                q, k8.float(), v8.float(), table, torch.tensor(lens), 0.125, k_dim_major=True
            )
            check(f"decode attention ({dtype}, fp8 e5m2 KV, block size {block_size})", got, want, tol)
            # The int8 pool: the reference reads the dequantized values.
            ki, vi = quantize_int8_pool(k_cache, dim_major=True), quantize_int8_pool(v_cache, dim_major=False)
            got = native.decode(q, ki, vi, table, torch.tensor(lens), 0.125)
            k_deq, v_deq = dequantize_int8(ki, 64, dim_major=True), dequantize_int8(vi, 64, dim_major=False)
            want = reference_decode_attention(q, k_deq, v_deq, table, torch.tensor(lens), 0.125, k_dim_major=True)
            check(f"decode attention ({dtype}, int8 KV, block size {block_size})", got, want, tol)

    bf16 = torch.bfloat16
    x = torch.randn(3, 40, generator=gen).to(bf16)
    weight = torch.randn(40, generator=gen).to(bf16)
    check("rms_norm", native.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), 3e-2)
    gate_up = torch.randn(3, 40, generator=gen).to(bf16)
    check("silu_mul", native.silu_mul(gate_up), silu_mul(gate_up.float()), 3e-2)
    heads, kv_heads, dim = 4, 2, 24
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen).to(bf16)
    angles = torch.rand(10, dim // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    positions, slots = torch.tensor([7, 0, 9]), torch.tensor([5, 0, 2])
    k_cache = torch.zeros(2, kv_heads, dim, 4, dtype=bf16)
    v_cache = torch.zeros(2, kv_heads, 4, dim, dtype=bf16)
    rotated = apply_rope(
        qkv[:, : (heads + kv_heads) * dim].float().view(3, -1, dim), cos[positions][:, None], sin[positions][:, None]
    )
    values = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim).clone()
    native.rope_store(qkv, positions, cos, sin, slots, k_cache, v_cache, heads)
    check("rope", qkv[:, : (heads + kv_heads) * dim].view(3, -1, dim), rotated, 3e-2)
    for t, slot in enumerate(slots.tolist()):
        check("kv store", k_cache[slot // 4, :, :, slot % 4], rotated[t, heads:], 3e-2)
        check("kv store", v_cache[slot // 4, :, slot % 4], values[t], 0)
    # fp8 e5m2: exactly torch's rounding of the rotated bf16 k and of v (40 dims: vector code and tail).
    qkv = torch.randn(3, (heads + 2 * kv_heads) * 40, generator=gen).to(bf16)
    angles = torch.rand(10, 20, generator=gen)
    k8 = torch.zeros(2, kv_heads, 40, 4, dtype=torch.float8_e5m2)
    v8 = torch.zeros(2, kv_heads, 4, 40, dtype=torch.float8_e5m2)
    native.rope_store(qkv, positions, angles.cos(), angles.sin(), slots, k8, v8, heads)
    rows = qkv.view(3, -1, 40)  # q and k rotated in place
    for t, slot in enumerate(slots.tolist()):
        k_want = rows[t, heads : heads + kv_heads].to(torch.float8_e5m2)
        v_want = rows[t, heads + kv_heads :].to(torch.float8_e5m2)
        check("fp8 k store", k8[slot // 4, :, :, slot % 4].float(), k_want.float(), 0)
        check("fp8 v store", v8[slot // 4, :, slot % 4].float(), v_want.float(), 0)
    # int8: exactly kv_cache.quantize_int8 of the rotated bf16 k and of v, values and scales; the
    # second token's k all zeros (scale 0, no NaN). 40 dims: vector code and tail.
    qkv = torch.randn(3, (heads + 2 * kv_heads) * 40, generator=gen).to(bf16)
    qkv[1, heads * 40 : (heads + kv_heads) * 40] = 0
    ki = torch.zeros(2, kv_heads, 44 * 4, dtype=torch.int8)
    vi = torch.zeros(2, kv_heads, 44 * 4, dtype=torch.int8)
    native.rope_store(qkv, positions, angles.cos(), angles.sin(), slots, ki, vi, heads)
    rows = qkv.view(3, -1, 40)
    (k_values, k_scales), (v_values, v_scales) = split_int8(ki, 40), split_int8(vi, 40)
    for t, slot in enumerate(slots.tolist()):
        block, offset = slot // 4, slot % 4
        for name, new, values, scales in (
            (
                "int8 k store",
                rows[t, heads : heads + kv_heads],
                k_values.view(2, kv_heads, 40, 4)[block, :, :, offset],
                k_scales,
            ),
            (
                "int8 v store",
                rows[t, heads + kv_heads :],
                v_values.view(2, kv_heads, 4, 40)[block, :, offset],
                v_scales,
            ),
        ):
            want_values, want_scales = quantize_int8(new)
            check(name, values, want_values, 0)
            check(f"{name} scale", scales[block, :, offset], want_scales, 0)

    # 7 rows: a full tile of 6 and a tail; 37 outputs: two panels and a partial one; 28 columns: 3 x 8 + 4.
    weight = torch.randn(37, 28, generator=gen).to(bf16)
    packed, bias = pack_bf16_weight(weight), torch.randn(37, generator=gen)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = torch.randn(7, 28, generator=gen).to(dtype)
        residual = torch.randn(7, 37, generator=gen).to(dtype)
        want = residual.float() + bias + x.float() @ weight.float().T
        check(f"bf16 linear ({dtype})", native.linear(x, packed, 37, bias, residual), want, tol)
    unpacked = native.unpack_into(packed, 37, torch.empty(37 * 28))
    check("bf16 unpack", unpacked, weight, 0)

    # The greedy pick: each row's first highest value (a row of 100: vector body and tail; a tie).
    logits = torch.randn(3, 100, generator=gen)
    logits[1, 70] = logits[1, 20] = logits[1].max() + 1
    got_ids, want_ids = native.argmax(logits), logits.max(dim=-1).indices
    if not torch.equal(got_ids, want_ids):
        raise RuntimeError(
            f"self-check of argmax ({native.path} path) failed: {got_ids.tolist()} != {want_ids.tolist()}"
        )
