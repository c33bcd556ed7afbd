"""Resolve the dtype / device settings ("auto" included) to torch objects."""

from __future__ import annotations

from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> torch.dtype:
    """ "auto": bfloat16 on CUDA or on a CPU with native bf16 instructions, else float32.

    Without native bf16 the CPU emulates it, which is slower than float32.
    """
    if name == "auto":
        if device.type == "cuda" or cpu_has_native_bf16(cpuinfo):
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, float32 or bfloat16")
    return _DTYPES[name]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False  # not Linux, or /proc hidden: stay with the safe choice
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(flag in flags for flag in _BF16_CPU_FLAGS)
    return False
