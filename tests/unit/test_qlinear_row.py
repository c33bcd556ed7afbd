"""The GGUF linears at one activation row (the decode step at concurrency 1): the AVX2 paths run
their own one-pass kernel there (csrc/qlinear_avx2.c), which must give the bits the tiles give
that row inside a larger call, with every epilogue (bias, residual, partial panels, SwiGLU)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from services.engine.model.quant_kernels import PATHS, QuantKernels, random_matrix
from services.engine.model.quantized import FORMATS

# Every path with its own code at one row; the others share it with more rows anyway.
ROW_PATHS = [path for path in PATHS if path != "amx_int8"]


def kernels_for(library: ctypes.CDLL, path: str) -> QuantKernels:
    kernels = QuantKernels(library, path, "int8")
    if path not in kernels.runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} path")
    return kernels


@pytest.mark.parametrize("path", ROW_PATHS)
def test_one_row_has_the_bits_of_that_row_in_a_larger_call(qlinear_library: ctypes.CDLL, path: str) -> None:
    kernels = kernels_for(qlinear_library, path)
    rng = np.random.default_rng(21)
    gen = torch.Generator().manual_seed(21)
    for kind in FORMATS:
        # 49 outputs: three whole panels and a partial one (its second half empty); 40: a partial first half.
        for outputs in (49, 40, 64):
            weight = random_matrix(kind, outputs, 192, rng)
            bias = torch.randn(outputs, generator=gen)
            wide = (torch.randn(3, 256, generator=gen) * 2).bfloat16()
            x = wide[:, 32:224]  # strided rows, as a view of a wider buffer
            residual = torch.randn(3, outputs, generator=gen).bfloat16()
            for with_bias, with_residual in ((False, False), (True, True)):
                b = bias if with_bias else None
                many = kernels.linear(x, weight, b, residual if with_residual else None)
                one = kernels.linear(x[:1], weight, b, residual[:1] if with_residual else None)
                assert torch.equal(one.view(torch.int16), many[:1].view(torch.int16)), (kind, outputs, with_bias)
                # A row of the product, not a copy of its inputs: it changes with the weights.
                assert not torch.equal(one, kernels.linear(x[1:2], weight, b))


@pytest.mark.parametrize("path", ROW_PATHS)
def test_one_row_swiglu_has_the_bits_of_that_row_in_a_larger_call(qlinear_library: ctypes.CDLL, path: str) -> None:
    kernels = kernels_for(qlinear_library, path)
    rng = np.random.default_rng(22)
    gen = torch.Generator().manual_seed(22)
    for kind in FORMATS:
        for inter in (16, 48):
            weight = random_matrix(kind, 2 * inter, 160, rng)
            bias = torch.randn(2 * inter, generator=gen)
            x = (torch.randn(5, 160, generator=gen) * 2).bfloat16()
            for b in (None, bias):
                many, one = kernels.swiglu(x, weight, b), kernels.swiglu(x[:1], weight, b)
                assert one.shape == (1, inter)
                assert torch.equal(one.view(torch.int16), many[:1].view(torch.int16)), (kind, inter)
