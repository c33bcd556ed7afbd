"""SwiGLU in the GGUF linear's epilogue (csrc/qlinear.h, QuantKernels.swiglu, StepLinears.swiglu).

silu(gate) * up written straight from gate_up's sums must equal gate_up's bf16 output followed by
the layer kernels' silu_mul (csrc/layers.c) on the same instruction set, bit for bit on the vector
paths; every path and variant, the portable path on every build target of test_quant_kernels.py
(qlinear_builds.MARCH_PATHS: the others are compiled by target attributes, whatever the target); and
the model's step with the fused SwiGLU gives the same logits as with gate_up then silu_mul.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.engine.model.native import NativeKernels, load_native_kernels
from services.engine.model.quant_kernels import PATHS, VARIANTS, ActivationScratch, QuantKernels, random_matrix
from services.engine.model.quantized import FORMATS, QuantizedMatrix
from services.engine.model.step_linears import StepLinears
from tests.unit.qlinear_builds import MARCH_PATHS, MARCHES, kernels_on

pytest.importorskip("gguf")

# The layer kernels' path whose silu_mul arithmetic each qlinear path's epilogue computes.
LAYER_PATH = {
    "portable": "portable",
    "avx2": "avx2",
    "avx2_vnni": "avx2",
    "avx512_vnni": "avx512",
    "amx_int8": "avx512",
}


def layer_kernels(path: str) -> NativeKernels:
    wanted = LAYER_PATH[path]
    native = load_native_kernels("native")
    if native is None or wanted not in native.runnable_paths():
        pytest.skip(f"this CPU cannot run the layer kernels' {wanted} path")
    return native.with_path(wanted)


def unfused(
    kernels: QuantKernels,
    native: NativeKernels,
    x: torch.Tensor,
    weight: QuantizedMatrix,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """gate_up [T, 2 * inter] in bf16, then the layer kernels' silu_mul: what the engine ran before."""
    return native.silu_mul(kernels.linear(x, weight, bias))


def portable_code(path: str, variant: str) -> bool:
    """Whether the kernel (and so its epilogue) is portable C: the portable path, and the float
    variant below AVX-512 (qlinear_float runs fgemm_portable there)."""
    return path == "portable" or (variant == "float" and path in ("avx2", "avx2_vnni"))


def assert_portable_close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    """The portable path against layers.c's portable silu_mul: layers.c is built with -ffast-math
    (its expf and division vectorized, denormals flushed), this library without, so a value may
    differ by one bf16 unit, and silu of a gate below about -87 is ~1e-35 here where it is 0 there."""
    error = (got.float() - want.float()).abs()
    assert (error <= 2**-7 * want.float().abs() + 1e-30).all(), what


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: object = None) -> None:
    """Bit for bit, except where both are below 1e-30 in magnitude: silu of a gate below about -87
    takes the reciprocal of ~1e38, a float32 subnormal, which a thread flushes to zero or keeps by its
    MXCSR. A library built with -ffast-math (layers.c's) sets flush-to-zero in the thread that loads
    it, and OpenMP threads created before that keep it off, so either side can give -0.0 or ~1e-35
    depending on which thread computed the column (seen in a full test run, not in this module alone)."""
    same = got.view(torch.int16) == want.view(torch.int16)
    tiny = (got.float().abs() < 1e-30) & (want.float().abs() < 1e-30)
    assert (same | tiny).all(), what


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_fused_equals_gate_up_then_silu_mul(qlinear_library: ctypes.CDLL, path: str, variant: str) -> None:
    kernels = kernels_on(qlinear_library, path, variant)
    native = layer_kernels(path)
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    for kind in FORMATS:
        # inter 48: 3 gate panels and 3 up panels (an odd pair count: the AMX-BF16 kernel's steps
        # hold two panels), 160 columns (5 blocks).
        for inter in (48, 16 * 6):
            weight = random_matrix(kind, 2 * inter, 160, rng)
            for tokens in (1, 3, 16, 17, 64, 128):
                x = (torch.randn(tokens, 160, generator=gen) * 2).bfloat16()
                want = unfused(kernels, native, x, weight)
                got = kernels.swiglu(x, weight)
                assert got.dtype == torch.bfloat16 and got.shape == (tokens, inter)
                if portable_code(path, variant):
                    assert_portable_close(got, want, (kind, inter, tokens))
                else:
                    assert_same_bits(got, want, (kind, inter, tokens))


@pytest.mark.parametrize("path", PATHS[1:])
def test_a_model_sized_gate_up_bit_for_bit(qlinear_library: ctypes.CDLL, path: str) -> None:
    """The default model's gate_up (2 x 1536 x 576, Q4_1) at 64 rows: ~10^5 outputs, enough to meet
    the near-ties where a float32 ulp of a different operation order shows in the bf16 result
    (g * inv * u instead of layers.c's (g * u) * inv missed there)."""
    variant = "auto" if path == "amx_int8" else "int8"
    kernels = kernels_on(qlinear_library, path, variant).with_amx_min_rows(16)
    native = layer_kernels(path)
    weight = random_matrix("Q4_1", 3072, 576, np.random.default_rng(16))
    x = (torch.randn(64, 576, generator=torch.Generator().manual_seed(16)) * 0.5).bfloat16()
    got, want = kernels.swiglu(x, weight), unfused(kernels, native, x, weight)
    assert_same_bits(got, want)


@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_bias_is_added_to_gate_and_up_before_the_product(qlinear_library: ctypes.CDLL, path: str) -> None:
    kernels = kernels_on(qlinear_library, path, "auto" if path == "amx_int8" else "int8")
    native = layer_kernels(path)
    weight = random_matrix("Q4_1", 64, 96, np.random.default_rng(12))
    bias = torch.randn(64, generator=torch.Generator().manual_seed(12))
    for tokens in (5, 32):
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens)).bfloat16()
        want = unfused(kernels, native, x, weight, bias)
        got = kernels.swiglu(x, weight, bias)
        if path == "portable":
            assert_portable_close(got, want, tokens)
        else:
            assert_same_bits(got, want, tokens)


@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_float32_output_is_silu_of_the_unrounded_sums(qlinear_library: ctypes.CDLL, path: str) -> None:
    """float32 out: nothing rounded, silu from a polynomial (~2e-7) against torch's."""
    for variant in ("int8", "float"):
        kernels = kernels_on(qlinear_library, path, variant)
        weight = random_matrix("Q4_0", 96, 128, np.random.default_rng(13))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(20, 128, generator=torch.Generator().manual_seed(13)).to(dtype)
            gate_up = kernels.linear(x, weight, out=torch.empty(20, 96))
            want = F.silu(gate_up[:, :48]) * gate_up[:, 48:]
            got = kernels.swiglu(x, weight, out=torch.empty(20, 48))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("march", MARCHES)
def test_a_gate_up_not_in_whole_panel_pairs_is_refused(qlinear_library: ctypes.CDLL) -> None:
    """inter 40: up would start inside a panel, so the fused path refuses it (callers run gate_up then
    silu_mul), and the C entry point returns -1 rather than compute on a wrong pairing."""
    kernels = kernels_on(qlinear_library, "portable")
    weight = random_matrix("Q8_0", 80, 64, np.random.default_rng(14))
    assert not kernels.fuses_swiglu(weight)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.swiglu(torch.randn(2, 64), weight)
    call = kernels.call_for(2, torch.float32, swiglu=True)
    x, out = torch.randn(2, 64), torch.empty(2, 40)
    scratch = [torch.empty(64 * 16, dtype=torch.int8), torch.empty(64, dtype=torch.float32)]
    args = (x.data_ptr(), 64, 0, 2, 64, weight.data.data_ptr(), 80, 2, None, None, 0, out.data_ptr(), 40, 0)
    assert call.function(call.path_code, *args, *(s.data_ptr() for s in scratch)) == -1


@pytest.mark.parametrize("march", MARCHES)
def test_step_linears_bind_the_fused_swiglu_only_in_whole_panel_pairs(qlinear_library: ctypes.CDLL) -> None:
    kernels = kernels_on(qlinear_library, "portable")
    rows, hidden = 4, 64
    matrices: list[QuantizedMatrix] = []  # alive while the bindings hold their addresses

    def bound(inter: int, activated: bool) -> StepLinears:
        # down's columns are a whole number of blocks in a real model (so 2 * inter always pairs
        # whole panels); here only gate_up's rows matter, and down is never called.
        shapes = ((96, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, 64))
        matrices.extend(random_matrix("Q4_1", r, c, np.random.default_rng(15)) for r, c in shapes)
        qkv, o, gate_up, down = ((m.cols, m.data.data_ptr(), m.rows, 1, None) for m in matrices[-4:])
        outs = (
            torch.empty(rows, 96, dtype=torch.bfloat16),
            torch.empty(rows, hidden, dtype=torch.bfloat16),
            torch.empty(rows, 2 * inter, dtype=torch.bfloat16),
            torch.empty(rows, hidden, dtype=torch.bfloat16),
        )
        act = torch.empty(rows, inter, dtype=torch.bfloat16) if activated else None
        return StepLinears(kernels, [(qkv, o, gate_up, down)], ActivationScratch(), rows=rows, outs=outs, activated=act)

    fused = bound(32, True)
    assert fused.fused_swiglu
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(15)).bfloat16()
    want = kernels.swiglu(x, matrices[-2])
    assert torch.equal(fused.swiglu(0, x), want)
    assert not bound(32, False).fused_swiglu
    assert not bound(40, True).fused_swiglu
    with pytest.raises(RuntimeError, match="without the fused SwiGLU"):
        bound(40, True).swiglu(0, x)
