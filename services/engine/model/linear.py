"""Linear layers in the fastest form torch offers for the device and dtype.

On the CPU in bfloat16, oneDNN with the weight reordered once at load time
("prepacked") is 1.2-2x faster than F.linear, which re-lays out the weight
on every call; it also fuses the residual add. float32 keeps F.linear: it is
the reference mode, and matching transformers' rounding matters more there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_prepacked(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear:
    """y = x @ weight.T + bias; weight [out, in], bias [out] or None, x [T, in]."""

    __slots__ = ("bias", "in_features", "out_features", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, packed: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight
        self.bias = bias

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + x @ weight.T + bias, fused where the backend can."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return residual + F.linear(x, self.weight, self.bias)
