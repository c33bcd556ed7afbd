"""Linear layers in the form the kernel plan (plan.py) chose.

On the CPU in bfloat16, oneDNN with the weight reordered once at load time
("prepacked") is 1.2-2x faster than F.linear, which re-lays out the weight
on every call; it also fuses the residual add. Where the CPU cannot multiply
bf16 (no oneDNN bf16 path, e.g. AVX2 + FMA only), the native bf16 linear
(``Bf16Linear``, csrc/bf16_linear.c) widens the bf16 weights in registers and
multiplies in float32 FMAs, reading 2 bytes per weight; without the native
kernels, bf16 weights are converted to float32 per call, into one reused
buffer (a fresh 100 MB tensor per call costs 7x the conversion in page
faults): torch's own bf16 matmul there is an order of magnitude slower.
float32 keeps F.linear: it is the reference mode, and matching transformers'
rounding matters more there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from services.engine.model.quantized import QuantizedMatrix

if TYPE_CHECKING:
    from services.engine.model.native import NativeKernels
    from services.engine.model.quant_kernels import QuantKernels


class ConversionBuffer:
    """Scratch for weights converted to the compute dtype, shared by every layer.

    Layers run one after another, so one buffer the size of the largest weight serves all."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._flat = torch.empty(0, dtype=dtype)

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        return self.take(weight.numel(), weight.device).view(weight.shape).copy_(weight)

    def take(self, numel: int, device: torch.device | None = None) -> torch.Tensor:
        """The first numel elements of the buffer (flat), grown if needed."""
        if self._flat.numel() < numel:
            self._flat = torch.empty(numel, dtype=self.dtype, device=device)
        return self._flat[:numel]


class Linear:
    """y = x @ weight.T + bias; weight [out, in], bias [out] or None, x [T, in].

    packed: reorder the weight for oneDNN at load. convert_into: compute in that
    buffer's dtype, converting the weight (kept in its storage dtype) per call."""

    __slots__ = ("bias", "conversion", "in_features", "out_features", "packed", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        packed: bool,
        convert_into: ConversionBuffer | None = None,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight
        self.bias = bias
        self.conversion = convert_into if convert_into is not None and convert_into.dtype != weight.dtype else None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, in] -> a new [T, out] tensor. out: ignored (see QuantizedLinear): oneDNN's and
        torch's linears have no output argument, and a copy into it would cost more than it saves."""
        if self.packed:
            # torch.ops resolves ops at run time, so mypy sees Any.
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # type: ignore[no-any-return]
        if self.conversion is not None:
            return self._converted(x).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: x [T, in] -> float32 [T, out], rounded through x's dtype first."""
        return self(x).float()

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """residual + x @ weight.T + bias, fused where the backend can; out ignored, as in __call__."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")  # type: ignore[no-any-return]
        if self.conversion is not None:
            return (residual.to(self.conversion.dtype) + self._converted(x)).to(residual.dtype)
        return residual + F.linear(x, self.weight, self.bias)

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        conversion = self.conversion
        if conversion is None:
            raise RuntimeError("this layer computes in its weights' dtype")
        bias = None if self.bias is None else self.bias.to(conversion.dtype)
        return F.linear(x.to(conversion.dtype), conversion.convert(self.weight), bias)


# From this many rows on, Bf16Linear widens the whole weight into a float32 buffer and
# calls torch's matmul instead: torch's float32 GEMM then beats ours by more than the
# widening costs. Decode step with the plan for an AVX2 CPU, torch's BLAS held to AVX2
# (docs/engine.md): the native kernel alone is 2.2x faster than widening at batch 1,
# 1.4x at 16 and 1.08x at 48, but 1.09x slower at 64 and 1.18x at 128.
NATIVE_BF16_MAX_ROWS = 64


class Bf16Linear:
    """The Linear interface on bf16 weights computed by the native bf16 linear (csrc/bf16_linear.c),
    for CPUs without bf16 arithmetic. weight [out, in] is repacked once into the kernel's panels
    (native.pack_bf16_weight, same bytes plus padding to 16 rows); bias is kept in float32.
    Activations enter and leave in their own dtype, float32 inside. From NATIVE_BF16_MAX_ROWS
    rows on, the weight is widened into convert_into (float32) and torch multiplies."""

    __slots__ = ("bias", "conversion", "in_features", "kernels", "out_features", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernels: NativeKernels,
        convert_into: ConversionBuffer | None = None,
    ) -> None:
        from services.engine.model.native import pack_bf16_weight

        self.out_features, self.in_features = weight.shape
        self.weight = pack_bf16_weight(weight)  # [ceil(out / 16), in, 8, 2] bf16
        self.bias = None if bias is None else bias.float().contiguous()
        self.kernels = kernels
        self.conversion = convert_into if convert_into is not None and convert_into.dtype == torch.float32 else None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, in] -> a new [T, out] tensor (out ignored, as Linear's)."""
        if self.conversion is not None and x.shape[0] >= NATIVE_BF16_MAX_ROWS:
            return F.linear(x.float(), self._widened(), self.bias).to(x.dtype)
        return self.kernels.linear(x, self.weight, self.out_features, self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: x [T, in] -> float32 [T, out], rounded through x's dtype first."""
        return self(x).float()

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """residual [T, out] + x @ weight.T + bias, the add done in the kernel's epilogue (out ignored)."""
        if self.conversion is not None and x.shape[0] >= NATIVE_BF16_MAX_ROWS:
            return (residual.float() + F.linear(x.float(), self._widened(), self.bias)).to(residual.dtype)
        return self.kernels.linear(x, self.weight, self.out_features, self.bias, residual)

    def _widened(self) -> torch.Tensor:
        """The weight as float32 [out, in], in the shared buffer."""
        if self.conversion is None:
            raise RuntimeError("this layer has no conversion buffer")
        return self.kernels.unpack_into(self.weight, self.out_features, self.conversion.take(self.numel))


class QuantizedLinear:
    """The Linear interface on GGUF block weights (quantized.py), computed by csrc/qlinear.c.

    Activations enter and leave in their own dtype (float32 or bfloat16), except the LM head's
    ``logits``, written in float32; bias is kept in float32. Given ``out``, the kernel writes
    there instead of into a new tensor (the forward's workspace): the same values."""

    __slots__ = ("bias", "in_features", "kernels", "out_features", "weight")

    def __init__(self, weight: QuantizedMatrix, bias: torch.Tensor | None, kernels: QuantKernels) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else bias.float().contiguous()
        self.kernels = kernels

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out_features] in x's dtype: out (contiguous rows, overlapping no
        input), or a new tensor when None. Returns it."""
        return self.kernels.linear(x, self.weight, self.bias, out=out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head: x [T, in] -> a new float32 [T, out_features], the kernel's float sums stored
        as they are: no bf16 rounding, and no separate conversion pass (0.4-0.5 ms at 64 x 49152 measured)."""
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        return self.kernels.linear(x, self.weight, self.bias, out=out)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """residual + x @ weight.T + bias, the add done in the kernel's epilogue; into out as in
        __call__ (out must not overlap residual: the kernel may write a row before it has read it)."""
        return self.kernels.linear(x, self.weight, self.bias, residual, out=out)
