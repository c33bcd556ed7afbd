"""The linear kernel on GGUF blocks (csrc/qlinear.c): every path this machine runs, every build target.

The paths are chosen at run time, so one library holds them all; the -march it
is built for changes the portable code and the activation quantization, so the
portable path is checked on every build and the paths compiled by target
attributes on the -march=native one (qlinear_builds.MARCH_PATHS), each against
the torch reference of quantized.py; a path or target the CPU cannot run is
skipped with the flags it lacks. The builds are shared by the session
(conftest.py: qlinear_library).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine.model import quant_kernels
from services.engine.model.cpu import CpuFeatures
from services.engine.model.plan import choose_plan
from services.engine.model.quant_kernels import PATH_FLAGS, VARIANTS, QuantKernels, path_for, random_matrix
from services.engine.model.quantized import FORMATS, QuantizedMatrix, reference_linear
from tests.unit.qlinear_builds import HOST, MARCH_PATHS, MARCHES, kernels_on

pytest.importorskip("gguf")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_every_path_equals_the_reference(qlinear_library: ctypes.CDLL, path: str, variant: str) -> None:
    kernels = kernels_on(qlinear_library, path, variant)
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    for kind in FORMATS:
        # 49 rows: 3 whole panels and a 1-row tail; 160 columns: 5 blocks (odd: the AMX loop's tail).
        weight = random_matrix(kind, 49, 160, rng)
        # Tiles of 16 activation rows: partial, whole, one past, and several with a tail.
        for tokens in (1, 3, 8, 13, 16, 17, 31, 64, 67):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(tokens, 160, generator=gen) * 3).to(dtype)
                bf16_weights = kernels.rounds_weights_to_bf16(tokens, dtype)
                want = reference_linear(x, weight, kernels.variant_for(tokens, dtype), bf16_weights)
                got = kernels.linear(x, weight)
                assert got.dtype == dtype and got.shape == (tokens, 49)
                # float32: summation order, and Q8_0 cancelling its +128 offset; bf16: the output's rounding.
                tol = 1e-4 if dtype == torch.float32 else 8e-3
                error = ((got.double() - want).abs() / (1 + want.abs())).max().item()
                assert error < tol, (kind, tokens, dtype, error)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_residual_and_bias_are_added_and_strided_rows_are_read(
    qlinear_library: ctypes.CDLL, path: str, variant: str
) -> None:
    kernels = kernels_on(qlinear_library, path, variant)
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(2)
    for kind in FORMATS:
        weight = random_matrix(kind, 24, 64, rng)
        for tokens in (5, 21):
            wide = torch.randn(tokens, 100, generator=gen)
            x = wide[:, 10:74]  # rows 100 apart
            bias = torch.randn(24, generator=gen)
            residual = torch.randn(tokens, 24, generator=gen)
            got = kernels.linear(x, weight, bias, residual)
            effective = kernels.variant_for(tokens, x.dtype)
            want = reference_linear(x.contiguous(), weight, effective) + bias.double() + residual.double()
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5, msg=f"{kind} {tokens} rows")


def test_amx_int8_switches_to_tiles_at_its_row_threshold(qlinear_library: ctypes.CDLL) -> None:
    """Below amx_min_rows the AVX-512 VNNI code runs, from it on the tiles: both equal the reference."""
    kernels = kernels_on(qlinear_library, "amx_int8").with_amx_min_rows(16)
    weight = random_matrix("Q4_1", 40, 96, np.random.default_rng(5))
    gen = torch.Generator().manual_seed(5)
    for tokens in (15, 16):
        x = torch.randn(tokens, 96, generator=gen)
        torch.testing.assert_close(
            kernels.linear(x, weight).double(), reference_linear(x, weight), atol=1e-4, rtol=1e-5
        )


@pytest.mark.parametrize("march", MARCHES)
def test_paths_agree_with_each_other_on_a_model_sized_matrix(qlinear_library: ctypes.CDLL) -> None:
    """The same integer sums on every path: outputs differ only by float summation order."""
    rng = np.random.default_rng(3)
    weight = random_matrix("Q4_1", 160, 576, rng)
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(3))
    runnable = QuantKernels(qlinear_library, "portable").runnable_paths()
    outputs = {path: QuantKernels(qlinear_library, path, amx_min_rows=1).linear(x, weight) for path in runnable}
    for path, out in outputs.items():
        torch.testing.assert_close(out, outputs["portable"], atol=1e-3, rtol=1e-5, msg=path)


def test_int8_activations_stay_close_to_the_float_product() -> None:
    """What quantizing the activations costs: the reference against the float matmul of the same weights."""
    weight = random_matrix("Q8_0", 64, 576, np.random.default_rng(4))
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = x @ weight.dequantize().double().T
    error = (reference_linear(x, weight) - exact).norm() / exact.norm()
    assert 0 < error < 0.01


def test_the_float_variant_on_bf16_tiles_rounds_only_the_weights(qlinear_library: ctypes.CDLL) -> None:
    """amx_int8 + float + bf16 activations: the product of bf16-rounded weights, accumulated in float32."""
    kernels = kernels_on(qlinear_library, "amx_int8", "float")
    if not kernels.rounds_weights_to_bf16(16, torch.bfloat16):
        pytest.skip("this CPU lacks amx_bf16 or avx512_bf16: the float variant dequantizes to float32 there")
    weight = random_matrix("Q4_1", 64, 576, np.random.default_rng(7))
    x = torch.randn(33, 576, generator=torch.Generator().manual_seed(7)).bfloat16()
    want = reference_linear(x, weight, "float", bf16_weights=True)
    torch.testing.assert_close(kernels.linear(x, weight).double(), want, atol=2e-2, rtol=8e-3)


def test_bf16_tiles_cover_odd_panel_counts_and_row_groups(qlinear_library: ctypes.CDLL) -> None:
    """The tiles block two 16-row groups by a pair of panels: a lone last panel (whole or partial), a lone
    last row group (whole or the padded tail), pairs split over threads, with bias and residual."""
    kernels = kernels_on(qlinear_library, "amx_int8", "float")
    if not kernels.rounds_weights_to_bf16(16, torch.bfloat16):
        pytest.skip("this CPU lacks amx_bf16 or avx512_bf16: the float variant dequantizes to float32 there")
    rng = np.random.default_rng(8)
    gen = torch.Generator().manual_seed(8)
    for kind in FORMATS:
        # 1, 3, 5 and 7 panels, the last whole or partial; 3 blocks.
        for rows in (16, 48, 72, 80, 104):
            weight = random_matrix(kind, rows, 96, rng)
            bias = torch.randn(rows, generator=gen)
            # Row groups: one, two, three whole, two and a tail, five and a tail.
            for tokens in (16, 32, 48, 40, 87):
                x = torch.randn(tokens, 96, generator=gen).bfloat16()
                residual = torch.randn(tokens, rows, generator=gen).bfloat16()
                got = kernels.linear(x, weight, bias, residual).double()
                want = reference_linear(x, weight, "float", bf16_weights=True) + bias.double() + residual.double()
                error = ((got - want).abs() / (1 + want.abs())).max().item()
                assert error < 8e-3, (kind, rows, tokens, error)


def test_bf16_tiles_pack_any_row_count_and_block_count(qlinear_library: ctypes.CDLL) -> None:
    """The activations are packed into zero-padded 16-row tiles and each step's epilogue runs spread
    over the next step's blocks: one block (the whole epilogue beside one), many (two rows per block),
    1 to 33 rows, rows read strided, with bias and residual."""
    kernels = kernels_on(qlinear_library, "amx_int8", "float")
    if not kernels.rounds_weights_to_bf16(16, torch.bfloat16):
        pytest.skip("this CPU lacks amx_bf16 or avx512_bf16: the float variant dequantizes to float32 there")
    rng = np.random.default_rng(9)
    gen = torch.Generator().manual_seed(9)
    for kind in FORMATS:
        for rows, cols in ((40, 32), (24, 1536)):
            weight = random_matrix(kind, rows, cols, rng)
            bias = torch.randn(rows, generator=gen)
            for tokens in (1, 15, 17, 33):
                wide = torch.randn(tokens, cols + 64, generator=gen).bfloat16()
                x = wide[:, 32 : 32 + cols]  # rows cols + 64 apart
                residual = torch.randn(tokens, rows, generator=gen).bfloat16()
                got = kernels.linear(x, weight, bias, residual).double()
                want = reference_linear(x.contiguous(), weight, "float", bf16_weights=True)
                want = want + bias.double() + residual.double()
                error = ((got - want).abs() / (1 + want.abs())).max().item()
                assert error < 8e-3, (kind, rows, cols, tokens, error)


def test_bf16_tiles_see_the_weights_rounded_to_bf16_bit_for_bit(qlinear_library: ctypes.CDLL) -> None:
    """One-hot activation rows read the dequantized B tiles back: x row t = e_t makes out[t, n] the
    tile's weight (n, t) alone, exact in float32, which must equal GGUF's float32 weight rounded to
    bf16 (every kind, both nibbles and every column position of a block, three panels)."""
    kernels = kernels_on(qlinear_library, "amx_int8", "float")
    if not kernels.rounds_weights_to_bf16(16, torch.bfloat16):
        pytest.skip("this CPU lacks amx_bf16 or avx512_bf16: the float variant dequantizes to float32 there")
    rng = np.random.default_rng(10)
    for kind in FORMATS:
        weight = random_matrix(kind, 40, 96, rng)
        x = torch.eye(96).bfloat16()
        got = kernels.linear(x, weight, out=torch.empty(96, 40))
        want = weight.dequantize().bfloat16().float().T
        assert torch.equal(got, want), kind


def test_auto_is_float_on_bf16_tiles_and_int8_elsewhere(qlinear_library: ctypes.CDLL) -> None:
    kernels = kernels_on(qlinear_library, "amx_int8", "auto").with_amx_min_rows(16)
    tiles = kernels.rounds_weights_to_bf16(16, torch.bfloat16)
    assert kernels.variant_for(16, torch.bfloat16) == ("float" if tiles else "int8")
    assert kernels.variant_for(15, torch.bfloat16) == "int8"
    assert kernels.variant_for(64, torch.float32) == "int8"
    assert kernels.with_path("avx512_vnni").variant_for(64, torch.bfloat16) == "int8"


@pytest.mark.parametrize("march", MARCHES)
def test_the_float_variant_computes_the_float_product(qlinear_library: ctypes.CDLL) -> None:
    """No activation rounding: float32 activations give the dequantized product to float32 summation error."""
    kernels = QuantKernels(qlinear_library, "portable").with_variant("float")
    best = kernels.with_path(kernels.runnable_paths()[-1])
    weight = random_matrix("Q4_1", 64, 576, np.random.default_rng(6))
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(6))
    exact = x.double() @ weight.dequantize().double().T
    for path_kernels in (kernels, best):
        error = (path_kernels.linear(x, weight).double() - exact).norm() / exact.norm()
        assert error < 1e-6, (path_kernels.path, error)


def test_the_path_follows_the_cpu_flags() -> None:
    assert path_for(CpuFeatures.simulated()) == "portable"
    assert path_for(CpuFeatures.simulated("avx2", "fma", "f16c")) == "avx2"
    assert path_for(CpuFeatures.simulated("avx2", "fma", "f16c", "avx_vnni")) == "avx2_vnni"
    sapphire = CpuFeatures.simulated(
        "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"
    )
    assert path_for(sapphire) == "avx512_vnni"
    assert path_for(CpuFeatures(sapphire.flags | {"amx_tile", "amx_int8", "amx_bf16"})) == "amx_int8"
    assert path_for(CpuFeatures(sapphire.flags | {"amx_tile"})) == "avx512_vnni"


def test_a_bad_quantization_setting_or_a_contradiction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SCALELLM_QUANTIZATION"):
        choose_plan("float32", torch.device("cpu"), "auto", quantization="int3", kernel_cache_dir=tmp_path)
    with pytest.raises(ValueError, match="SCALELLM_KERNELS"):
        choose_plan("float32", torch.device("cpu"), "torch", quantization="gguf", kernel_cache_dir=tmp_path)


def test_the_plan_names_the_kernel_and_its_path(kernel_cache_dir: Path) -> None:
    plan = choose_plan("float32", torch.device("cpu"), "auto", quantization="gguf", kernel_cache_dir=kernel_cache_dir)
    assert plan.quantized is not None and plan.quantized.path == path_for(HOST)
    assert f"({path_for(HOST)} kernel)" in plan.describe()
    assert any("quantization gguf" in reason for reason in plan.reasons)
    assert choose_plan("float32", torch.device("cpu"), "auto", kernel_cache_dir=kernel_cache_dir).quantized is None


def test_a_plan_for_an_avx2_cpu_runs_the_avx2_path(kernel_cache_dir: Path) -> None:
    if not HOST.has(*PATH_FLAGS["avx2"]):
        pytest.skip("this CPU lacks AVX2")
    zen3 = CpuFeatures.simulated("avx2", "fma", "f16c")
    plan = choose_plan(
        "float32", torch.device("cpu"), "auto", zen3, kernel_cache_dir=kernel_cache_dir, quantization="gguf"
    )
    assert plan.quantized is not None and plan.quantized.path == "avx2"


def test_unsupported_blocks_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Q5_0"):
        QuantizedMatrix.from_gguf_blocks("Q5_0", np.zeros((16, 22), dtype=np.uint8), 32)


def test_a_bad_quantization_setting_stops_start_up_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import EngineSettings, load_settings

    monkeypatch.setenv("SCALELLM_QUANTIZATION", "int4")
    with pytest.raises(SystemExit, match="SCALELLM_QUANTIZATION"):
        load_settings(EngineSettings)
    monkeypatch.setenv("SCALELLM_QUANTIZATION", "gguf")
    assert load_settings(EngineSettings).quantization == "gguf"


@pytest.mark.parametrize(("march", "path"), MARCH_PATHS)
def test_out_receives_the_same_result_in_either_output_dtype(qlinear_library: ctypes.CDLL, path: str) -> None:
    """out= writes what a call without it returns (bitwise), into a strided view; float32 out for bf16 x
    holds the sums before their bf16 rounding, which round to the bf16 result."""
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    for variant in ("int8", "float"):
        kernels = kernels_on(qlinear_library, path, variant)
        for kind in FORMATS:
            weight = random_matrix(kind, 40, 96, rng)
            bias = torch.randn(40, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                for tokens in (3, 17):
                    x = torch.randn(tokens, 96, generator=gen).to(dtype)
                    residual = torch.randn(tokens, 40, generator=gen).to(dtype)
                    want = kernels.linear(x, weight, bias, residual)
                    wide = torch.full((tokens, 50), 7.0, dtype=dtype)
                    got = kernels.linear(x, weight, bias, residual, out=wide[:, 5:45])
                    assert got.data_ptr() == wide[:, 5:45].data_ptr()
                    assert torch.equal(wide[:, 5:45], want), f"{variant} {kind} {dtype} {tokens}"
                    assert torch.equal(wide[:, :5], torch.full((tokens, 5), 7.0, dtype=dtype))
                    if dtype == torch.bfloat16:
                        wide32 = torch.empty(tokens, 40, dtype=torch.float32)
                        kernels.linear(x, weight, bias, residual, out=wide32)
                        assert torch.equal(wide32.bfloat16(), want), f"{variant} {kind} float32 out {tokens}"


def test_a_bad_out_is_refused_with_the_reason() -> None:
    cases = {
        "must be [4, 16]": torch.empty(4, 17),
        "or torch.float32, not torch.float16": torch.empty(4, 16, dtype=torch.float16),
        "stride(1) == 1": torch.empty(16, 4).T,
        "rows overlap": torch.empty(64).as_strided((4, 16), (8, 1)),
    }
    for reason, out in cases.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            quant_kernels._check_out(out, 4, 16, torch.float32)


_FAILING_ALLOCATION = """
import ctypes, resource, sys
import numpy as np, torch
from services.engine.model.quant_kernels import QuantKernels, random_matrix

kernels = QuantKernels(ctypes.CDLL(sys.argv[1]), "amx_int8", "float", amx_min_rows=1)
if "amx_int8" not in kernels.runnable_paths() or not kernels.rounds_weights_to_bf16(32, torch.bfloat16):
    print("SKIP")
    sys.exit(0)
torch.set_num_threads(2)
weight = random_matrix("Q4_0", 16, 576, np.random.default_rng(0))
kernels.linear(torch.randn(32, 576).bfloat16(), weight)  # the OpenMP threads exist before the limit
rows = 200_000
x = torch.empty(rows, 576, dtype=torch.bfloat16)  # 230 MB, untouched; each thread's scratch would be as big
kernels._scratch.take(torch.float32, rows * 576)  # the Python side's scratch, before the limit
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    kernels.linear(x, weight)
except MemoryError as exc:
    print("MemoryError:", exc)
"""


def test_a_failed_scratch_allocation_is_a_memory_error(qlinear_library: ctypes.CDLL) -> None:
    """The AMX-BF16 kernel's per-thread scratch (as big as the activations) cannot be allocated under an
    address-space limit: the call raises MemoryError instead of writing through a null pointer."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _FAILING_ALLOCATION, qlinear_library._name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    if result.stdout.strip() == "SKIP":
        pytest.skip("the AMX-BF16 tiles do not run on this CPU (amx_bf16, avx512_bf16, or the AMX tile permission)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemoryError: quantized linear (amx_int8, 200000 x 576 activations, 16 outputs)" in result.stdout
