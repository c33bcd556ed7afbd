"""What the CPU can do, read once at start-up, so every kernel choice has one source.

The machines this runs on differ (AVX2-only, AVX-512 with or without native
bfloat16, AMX), and torch does not say in advance which of its bfloat16 paths
will work: oneDNN's prepacked bf16 linear raises at load time on a CPU without
AVX-512 BW/VL/DQ or AVX-NE-CONVERT. ``CpuFeatures`` holds the flags and answers
those questions; tests build one by hand to stand in for a CPU they lack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Instructions that multiply bfloat16 in hardware: with one of them, bf16 is the
# fastest format; without, the CPU converts to float32 for every multiply.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# What oneDNN's bf16 matmul needs (torch's mkldnn_bf16_device_check on x86).
ONEDNN_BF16_AVX512 = ("avx512bw", "avx512vl", "avx512dq")
ONEDNN_BF16_NE_CONVERT = "avx_ne_convert"
# The flags worth naming in the start-up log, in order of capability.
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx_ne_convert",
    "amx_tile",
    "amx_bf16",
)


def _onednn_reports_bf16() -> bool | None:
    """torch's own answer, when this build can give it."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    # torch leaves mkldnn.is_available unannotated.
    if check is None or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    try:
        return bool(check())
    except RuntimeError:
        return None


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    flags: frozenset[str]
    # Whether oneDNN's bfloat16 matmul (prepacked linears) runs here; None: infer from flags.
    onednn_bf16_override: bool | None = None

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
        """This machine's features; no flags when /proc/cpuinfo is unreadable (the safe choice)."""
        flags: frozenset[str] = frozenset()
        try:
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[-1].split())
                    break
        except OSError:
            pass
        return cls(flags, onednn_bf16_override=_onednn_reports_bf16())

    @classmethod
    def simulated(cls, *flags: str) -> CpuFeatures:
        """A CPU with exactly these flags, oneDNN's bf16 support inferred from them (for tests)."""
        return cls(frozenset(flags))

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)

    @property
    def onednn_bf16(self) -> bool:
        if self.onednn_bf16_override is not None:
            return self.onednn_bf16_override
        return ONEDNN_BF16_NE_CONVERT in self.flags or all(flag in self.flags for flag in ONEDNN_BF16_AVX512)

    @property
    def avx512(self) -> bool:
        return all(flag in self.flags for flag in ("avx512f", *ONEDNN_BF16_AVX512))

    def has(self, *flags: str) -> bool:
        return all(flag in self.flags for flag in flags)

    def describe(self) -> str:
        """'avx2 fma avx512f ...; without avx_ne_convert amx_bf16': the flags that steer kernel choice."""
        present = [flag for flag in REPORTED_FLAGS if flag in self.flags]
        missing = [flag for flag in REPORTED_FLAGS if flag not in self.flags]
        text = " ".join(present) or "none of the vector extensions"
        return f"{text}; without {' '.join(missing)}" if missing else text
