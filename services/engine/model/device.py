"""Resolve the dtype / device settings ("auto" included) to torch objects."""

from __future__ import annotations

import torch

from services.engine.model.cpu import CpuFeatures

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, cpu: CpuFeatures | None = None) -> torch.dtype:
    """ "auto": bfloat16 on CUDA or on a CPU with native bf16 instructions, else float32.

    Without native bf16, torch's own bf16 ops (the transformers backend) are slower
    than float32. The torch engine's kernel plan (plan.py) stores bf16 on every CPU
    instead: its kernels widen bf16 to float32 in registers.
    cpu: the CPU to decide for (default: this one).
    """
    if name == "auto":
        if device.type == "cuda" or (cpu or CpuFeatures.detect()).native_bf16:
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, float32 or bfloat16")
    return _DTYPES[name]
