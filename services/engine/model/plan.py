"""The kernel plan: number formats and kernels, chosen once at start-up and passed down.

One decision, one place: the runner asks ``choose_plan`` and hands the result to
the model, the attention metadata and the KV pool, which never look at the CPU
themselves, and take everything that follows from "native kernels or not" (the
K layout, who stores new K/V) from the plan's properties. The plan keeps the
reasons for its choices so the engine can log them: which dtype, which kernels,
and the CPU flags that decided.

bfloat16 on a CPU without oneDNN's bf16 matmul (no AVX-512 BW/VL/DQ, no
AVX-NE-CONVERT, e.g. AMD Zen 3) is a storage format only: weights and the KV
cache stay bf16 (half the memory of float32), and every matmul converts its
operands to float32. torch's own bf16 matmul there runs at about 1 GFLOP/s,
and oneDNN's prepacked weights are refused outright, so converting is both
the working and the fast choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.engine.model.cpu import ONEDNN_BF16_AVX512, ONEDNN_BF16_NE_CONVERT, CpuFeatures
from services.engine.model.device import resolve_dtype
from services.engine.model.native import KERNEL_CHOICES, NativeKernels, load_native_kernels
from services.engine.model.native import path_for as native_path_for
from services.engine.model.quant_kernels import PATH_FLAGS, QuantKernels, load_quant_kernels, path_for

if TYPE_CHECKING:  # at run time imported where used: prefill_attention imports attention, which imports this module
    from services.engine.model.prefill_attention import PrefillKernels

log = logging.getLogger(__name__)

# SCALELLM_QUANTIZATION (shared/settings.py declares the same choices without importing torch).
QUANTIZATION_CHOICES = ("auto", "none", "gguf", "int8")
# SCALELLM_KV_CACHE_DTYPE, likewise: auto is int8 for bf16 on the native CPU kernels, else the model's
# dtype (auto_kv_cache_dtype); bfloat16 a bf16 model's pool unquantized; fp8_e5m2 (vLLM's name) one byte
# per value; int8 one byte per value and a float32 scale per (token, KV head) vector (kv_cache.py). The
# 8-bit formats: native CPU kernels only.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
# The formats only the native kernels read and write.
QUANTIZED_KV_CACHE_DTYPES = ("fp8_e5m2", "int8")


@dataclass(frozen=True, slots=True)
class KernelPlan:
    dtype: torch.dtype  # weights, activations between ops, and the KV cache
    compute_dtype: torch.dtype  # what matmuls and attention scores are computed in
    prepacked_linears: bool  # oneDNN linears, weights reordered once at load
    native: NativeKernels | None  # the compiled CPU kernels (native.py), when in use
    reasons: tuple[str, ...]
    # The linear kernel on GGUF block weights (quant_kernels.py), with SCALELLM_QUANTIZATION gguf or int8.
    quantized: QuantKernels | None = None
    # The SCALELLM_QUANTIZATION in effect: "none" also when the kernel failed and float weights are used.
    quantization: str = "none"
    # The KV pool's format when it is not dtype (SCALELLM_KV_CACHE_DTYPE fp8_e5m2: float8_e5m2; int8:
    # int8 with a float32 scale per token and KV head, kept in the pool beside the values, kv_cache.py).
    kv_dtype: torch.dtype | None = None
    # A fresh prompt's causal attention on AMX-BF16 tiles (prefill_attention.py), where it beats SDPA.
    prefill: PrefillKernels | None = None

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV pool stores: dtype, or the 8-bit format, which only the native kernels read and write."""
        return self.kv_dtype or self.dtype

    @property
    def native_layers(self) -> NativeKernels | None:
        """The fused bf16 norm / RoPE / SiLU kernels; float32 stays op for op with transformers."""
        return self.native if self.dtype == torch.bfloat16 else None

    @property
    def k_dim_major(self) -> bool:
        """K pool layout [blocks, KV, D, block_size], what the native decode kernel reads (kv_cache.py)."""
        return self.native is not None

    @property
    def stores_kv_natively(self) -> bool:
        """The native RoPE kernel writes the new K/V into the pool, so attention must not."""
        return self.native_layers is not None

    @property
    def native_linears(self) -> NativeKernels | None:
        """The native bf16 linear (bf16 weights widened in registers), where oneDNN cannot multiply bf16."""
        if self.dtype == torch.bfloat16 and self.compute_dtype == torch.float32 and not self.prepacked_linears:
            return self.native
        return None

    @property
    def linear_kind(self) -> str:
        if self.prepacked_linears:
            return "oneDNN prepacked"
        if self.native_linears is not None:
            return f"bf16 weights widened to float32 in registers (native {self.native_linears.path} kernel)"
        if self.compute_dtype != self.dtype:
            return f"{_name(self.dtype)} weights computed in {_name(self.compute_dtype)}"
        return "torch F.linear"

    def describe(self) -> str:
        kernels = f"native ({self.native.path})" if self.native else "torch"
        if self.prefill is not None:
            kernels += f", prefill attention native ({self.prefill.path})"
        linears = self.linear_kind
        if self.quantized is not None:
            weights = "GGUF blocks" if self.quantization == "gguf" else "int8 per-channel weights"
            linears = f"{weights} x {self.quantized.activations} ({self.quantized.path} kernel), others {linears}"
        return (
            f"dtype {_name(self.dtype)}, linears: {linears}, attention/layer kernels: {kernels}, "
            f"KV cache {_name(self.kv_cache_dtype)}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_plan(
    dtype: str,
    device: torch.device,
    kernels: str,
    cpu: CpuFeatures | None = None,
    *,
    kernel_cache_dir: str | Path | None = None,
    quantization: str = "none",
    kv_cache_dtype: str = "auto",
    gguf_available: bool = False,
) -> KernelPlan:
    """dtype: the SCALELLM_DTYPE setting; kernels: SCALELLM_KERNELS, "auto", "torch" or "native";
    cpu: the CPU to plan for (default: this one); kernel_cache_dir: where compiled
    kernels are kept (SCALELLM_KERNEL_CACHE_DIR; None: native.default_cache_dir());
    quantization: SCALELLM_QUANTIZATION, "none", "gguf" (compute on the GGUF's blocks), "int8"
    (safetensors weights quantized at load to int8 per output channel, on the same kernel) or
    "auto" (``auto_quantization``; gguf_available: the model has a GGUF to compute on);
    kv_cache_dtype: SCALELLM_KV_CACHE_DTYPE, "auto" (``auto_kv_cache_dtype``: int8 for bfloat16 with the
    native kernels, else the KV pool in dtype), "bfloat16" (a bfloat16 model's pool unquantized; refused
    for another dtype), "fp8_e5m2" (one byte per value) or "int8" (one byte per value and a float32 scale
    per token and KV head); the 8-bit formats are written and read by the native kernels only."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels choice {kernels!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"unknown quantization {quantization!r} (SCALELLM_QUANTIZATION); expected one of "
            f"{', '.join(QUANTIZATION_CHOICES)}"
        )
    if quantization not in ("none", "auto") and (device.type != "cpu" or kernels == "torch"):
        raise ValueError(
            f"SCALELLM_QUANTIZATION={quantization} computes on the CPU with native kernels: it needs SCALELLM_DEVICE=cpu "
            f"(here {device.type}) and SCALELLM_KERNELS auto or native (here {kernels})"
        )
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"unknown KV cache dtype {kv_cache_dtype!r} (SCALELLM_KV_CACHE_DTYPE); expected one of "
            f"{', '.join(KV_CACHE_DTYPES)}"
        )
    if kv_cache_dtype in QUANTIZED_KV_CACHE_DTYPES and (device.type != "cpu" or kernels == "torch"):
        raise ValueError(
            f"SCALELLM_KV_CACHE_DTYPE={kv_cache_dtype} is written and read by the native CPU kernels only: it needs "
            f"SCALELLM_DEVICE=cpu (here {device.type}) and SCALELLM_KERNELS auto or native (here {kernels})"
        )
    if device.type != "cpu":
        if kernels == "native":
            raise ValueError("the native kernels run on the CPU only")
        chosen = resolve_dtype(dtype, device)
        _check_unquantized_kv(kv_cache_dtype, chosen)
        return KernelPlan(chosen, chosen, False, None, (f"{device.type} device",))
    cpu = cpu or CpuFeatures.detect()
    # auto is bf16 on every CPU: half the bytes per weight and per KV entry, and the
    # native kernels widen bf16 in registers where the CPU cannot multiply it.
    chosen = torch.bfloat16 if dtype == "auto" else resolve_dtype(dtype, device, cpu)
    _check_unquantized_kv(kv_cache_dtype, chosen)
    reasons = [f"CPU flags: {cpu.describe()}"]
    if dtype == "auto":
        reasons.append(
            "auto picked bfloat16: the CPU multiplies bf16 natively"
            if cpu.native_bf16
            else "auto picked bfloat16 storage (weights, KV cache): no avx512_bf16 or amx_bf16, so it is widened to "
            "float32 for the arithmetic"
        )
    compute, prepacked = chosen, False
    if chosen == torch.bfloat16:
        if cpu.onednn_bf16 and _prepacking_available():
            prepacked = True
            reasons.append("bf16 linears by oneDNN with prepacked weights")
        else:
            compute = torch.float32
            reasons.append(
                f"oneDNN's bf16 matmul needs {'+'.join(ONEDNN_BF16_AVX512)} or {ONEDNN_BF16_NE_CONVERT}, which this "
                "CPU lacks: bf16 is the storage format (weights, KV cache), matmuls and attention run in float32 "
                "(the native kernels widen bf16 in registers; without them each matmul converts its weight)"
            )
    if quantization == "auto":
        quantization, why = auto_quantization(chosen, kernels, gguf_available=gguf_available)
        reasons.append(f"quantization auto picked {quantization}: {why}")
    native = load_native_kernels(kernels, kernel_cache_dir, native_path_for(cpu))
    if native is not None:
        reasons.append(f"native kernels: {native.path} path (this CPU runs {', '.join(native.runnable_paths())})")
    quantized = _quantized_kernels(quantization, kernels, cpu, kernel_cache_dir, reasons)
    if kv_cache_dtype == "auto":
        kv_cache_dtype, why = auto_kv_cache_dtype(chosen, native)
        reasons.append(f"KV cache auto picked {kv_cache_dtype}: {why}")
    kv_dtype = _kv_dtype(kv_cache_dtype, chosen, native, reasons)
    prefill = _prefill_kernels(chosen, native, cpu, kernel_cache_dir, reasons)
    return KernelPlan(
        chosen,
        compute,
        prepacked,
        native,
        tuple(reasons),
        quantized,
        quantization if quantized is not None else "none",
        kv_dtype,
        prefill,
    )


def _check_unquantized_kv(kv_cache_dtype: str, chosen: torch.dtype) -> None:
    """SCALELLM_KV_CACHE_DTYPE=bfloat16 names the pool of a bfloat16 model: refused for another dtype."""
    if kv_cache_dtype == "bfloat16" and chosen != torch.bfloat16:
        raise ValueError(
            f"SCALELLM_KV_CACHE_DTYPE=bfloat16 keeps a bfloat16 model's KV cache unquantized, but the model runs in "
            f"{_name(chosen)} (SCALELLM_DTYPE): use auto, fp8_e5m2 or int8"
        )


def _kv_dtype(
    kv_cache_dtype: str, chosen: torch.dtype, native: NativeKernels | None, reasons: list[str]
) -> torch.dtype | None:
    """The KV pool's format when it is not the model's dtype (KernelPlan.kv_dtype), with the reason."""
    kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
    if kv_dtype is None or kv_dtype == chosen:
        return None
    if native is None:  # kernels auto, and they failed (native raised in load_native_kernels)
        log.warning(
            "native kernels unavailable, SCALELLM_KV_CACHE_DTYPE=%s keeps the KV cache in %s",
            kv_cache_dtype,
            _name(chosen),
        )
        reasons.append(f"KV cache {kv_cache_dtype} requested, but the native kernels failed: {_name(chosen)}")
        return None
    ratio = torch.empty((), dtype=chosen).element_size()
    if kv_dtype == torch.int8:
        reasons.append(
            f"KV cache int8: one byte per K/V value and a float32 scale per token and KV head (absmax / 127, "
            f"rounded to nearest), about 1/{ratio} of {_name(chosen)}'s bytes read per decode step and nearly "
            f"{ratio}x the blocks in the same memory; widened to float32 and scaled in registers by the native kernels"
        )
    else:
        reasons.append(
            f"KV cache {kv_cache_dtype}: one byte per K/V value (the top byte of a float16, rounded to nearest "
            f"even), 1/{ratio} of {_name(chosen)}'s bytes read per decode step and {ratio}x the blocks in the "
            "same memory; widened to float32 in registers by the native kernels"
        )
    return kv_dtype


def _prefill_kernels(
    chosen: torch.dtype,
    native: NativeKernels | None,
    cpu: CpuFeatures,
    cache_dir: str | Path | None,
    reasons: list[str],
) -> PrefillKernels | None:
    """The native prefill attention where it is faster than SDPA, built now (not at the first prompt),
    else None with the reason: only its AMX-BF16 path beats SDPA (prefill_attention.NativeFreshPrefill);
    it serves the bf16 layer kernels' fresh-prompt steps."""
    if native is None or chosen != torch.bfloat16:
        return None
    from services.engine.model.prefill_attention import PATH_FLAGS as PREFILL_PATH_FLAGS
    from services.engine.model.prefill_attention import load_prefill_kernels

    if not cpu.has(*PREFILL_PATH_FLAGS["amx_bf16"]):
        reasons.append("prefill attention: SDPA (the native kernel is faster only on AMX-BF16, which this CPU lacks)")
        return None
    loaded = load_prefill_kernels(cache_dir)
    if loaded is None or loaded.path != "amx_bf16":
        reasons.append("prefill attention: SDPA (the native AMX-BF16 kernel is unavailable: see the warning)")
        return None
    reasons.append("prefill attention: native amx_bf16 kernel (a fresh prompt's causal attention on AMX-BF16 tiles)")
    return loaded


def auto_kv_cache_dtype(dtype: torch.dtype, native: NativeKernels | None) -> tuple[str, str]:
    """What SCALELLM_KV_CACHE_DTYPE=auto means on the CPU: "int8" or the model's dtype ("auto"), and why.

    int8 where the native kernels run a bfloat16 model: perplexity within 0.1% of bf16 KV's and
    batch-64 decode steps 17-21% faster (docs/engine.md "int8 KV cache"). float32 stays float32: it is
    the reference mode, held to transformers. fp8_e5m2 is never picked: +2.3% perplexity."""
    if dtype != torch.bfloat16:
        return "auto", f"the model's dtype: {_name(dtype)} is the reference mode, kept equal to transformers"
    if native is None:
        return "auto", "the model's dtype: int8 is read and written by the native kernels, which are not in use"
    return "int8", "within 0.1% of bf16 KV's perplexity, and half the bytes each decode step reads"


def auto_quantization(dtype: torch.dtype, kernels: str, *, gguf_available: bool) -> tuple[str, str]:
    """What SCALELLM_QUANTIZATION=auto means on the CPU: "gguf" or "none", and why.

    The fastest path whose perplexity stays within 1% of the float path's (issue 8, item 5;
    docs/engine.md "Quantized weights": +0.02-0.25% for the default model's Q4_1 GGUF, and
    faster than bf16 at batch 1 and 64). float32 stays float: it is the reference mode, held
    to transformers token for token. int8 is never picked: its +0.9% leaves no margin."""
    if kernels == "torch":
        return "none", "the block kernel is native and SCALELLM_KERNELS=torch"
    if not gguf_available:
        return "none", "the model has no GGUF to compute on"
    if dtype != torch.bfloat16:
        return "none", f"{_name(dtype)} is the reference mode, kept equal to transformers"
    return "gguf", "the model ships a GGUF, and its blocks are faster than bf16 weights at every batch size measured"


def _quantized_kernels(
    quantization: str, kernels: str, cpu: CpuFeatures, cache_dir: str | Path | None, reasons: list[str]
) -> QuantKernels | None:
    """The block kernel (GGUF's, which int8 weights also use) for this CPU's best path, or None
    (with the reason) without one."""
    if quantization == "none":
        return None
    path = path_for(cpu)
    loaded = load_quant_kernels(path, cache_dir)
    if isinstance(loaded, Exception):
        if kernels == "native":
            raise RuntimeError(
                f"the block kernel SCALELLM_QUANTIZATION={quantization} needs is unavailable: {loaded}"
            ) from loaded
        log.warning("block kernel unavailable, SCALELLM_QUANTIZATION=%s uses float weights: %s", quantization, loaded)
        reasons.append(f"quantization {quantization} requested, but its kernel failed ({loaded}): float weights")
        return None
    if quantization == "gguf":
        # Float activations where the AMX-BF16 kernel runs: faster at large batches and closer to the
        # float path; int8 elsewhere (docs/engine.md, "Quantized weights").
        loaded = loaded.with_variant("auto")
    path = loaded.path  # amx_int8 falls back to avx512_vnni where the kernel refuses the tile state
    needs = "+".join(PATH_FLAGS[path]) or "no vector extension"
    weights = (
        "Q4_0/Q4_1/Q8_0 linears computed on their blocks"
        if quantization == "gguf"
        else "linears, embedding and LM head quantized at load to int8, one scale per output channel (Q8_0 blocks)"
    )
    reasons.append(
        f"quantization {quantization}: {weights}, {loaded.activations} (int8: per block of 32), "
        f"{path} kernel ({needs}; this CPU runs {', '.join(loaded.runnable_paths())})"
    )
    return loaded


def _prepacking_available() -> bool:
    # torch leaves mkldnn.is_available unannotated.
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # type: ignore[no-untyped-call]
