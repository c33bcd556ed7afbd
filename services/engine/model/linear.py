"""Linear layers in the form the kernel plan (plan.py) chose.

On the CPU in bfloat16, oneDNN with the weight reordered once at load time
("prepacked") is 1.2-2x faster than F.linear, which re-lays out the weight
on every call; it also fuses the residual add. Where the CPU cannot multiply
bf16 (no oneDNN bf16 path), bf16 weights are converted to float32 per call:
torch's own bf16 matmul there is an order of magnitude slower. float32 keeps
F.linear: it is the reference mode, and matching transformers' rounding
matters more there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    """y = x @ weight.T + bias; weight [out, in], bias [out] or None, x [T, in].

    packed: reorder the weight for oneDNN at load. compute_dtype: the dtype the
    product is computed in, when it differs from the weight's (storage) dtype."""

    __slots__ = ("bias", "compute_dtype", "in_features", "out_features", "packed", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        packed: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight
        self.bias = bias
        self.compute_dtype = None if compute_dtype in (None, weight.dtype) else compute_dtype

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.compute_dtype is not None:
            return self._converted(x).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + x @ weight.T + bias, fused where the backend can."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if self.compute_dtype is not None:
            return (residual.to(self.compute_dtype) + self._converted(x)).to(residual.dtype)
        return residual + F.linear(x, self.weight, self.bias)

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)
