"""Native causal attention of a fresh prefill chunk (csrc/prefill_attention*.c): build, check, call,
and ``NativeFreshPrefill``, attention.FreshPrefill's drop-in that runs it.

attention.FreshPrefill attends a lone prompt's first chunk by torch's SDPA over views of the
fused qkv rows: 128-150 us per layer at 128 tokens in the step (Intel Xeon SPR, avx512f/amx) for
~19 MFLOP. This kernel reads q, k, v in place from the same rows (any row stride), shares each
KV head among its query heads (GQA) and writes [T, H * D] bf16 into the caller's buffer.

One library holds every path, each compiled for its instruction set by function target
attributes and chosen at run time from the CPU (``PATHS``, fastest last): AMX-BF16 tiles where
the CPU has them and the kernel grants the tile state, then AVX-512, AVX2 + FMA, portable C (the
float paths widen bf16 by shifts). It is compiled on first use like the other native libraries
(native_build._build: cached per source, flags and CPU), checked against a float64 reference on
small inputs, and the caller falls back to SDPA when anything fails, for float32 activations, and
for head dims the kernels do not take (a multiple of 32 up to 256).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from pathlib import Path

import torch

from services.engine.model.attention import FreshPrefill
from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import _build, _declare, _resolve_cache_dir

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("prefill_attention.c", "prefill_attention_vec.c", "prefill_attention_amx.c")
]
# No -ffast-math: the exp's rounding by a magic constant must survive (csrc/prefill_attention.h).
# -Wno-psabi: the float vector helpers are inlined, never passed between differently built objects.
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi"]
STEM = "scalellm_prefill_attention"
# Path names in the library's order (prefill_attention.h: PA_*), slowest first.
PATHS = ("portable", "avx2", "avx512", "amx_bf16")
# The CPU flags (/proc/cpuinfo names) each path needs.
PATH_FLAGS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "amx_bf16": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16"),
}
_STATUS = {
    -1: "bad arguments",
    -2: "this CPU cannot run the path",
    -3: "the scratch buffer is too small",
    -4: "unsupported head dim (the kernels take multiples of 32 up to 256)",
}


def path_for(cpu: CpuFeatures) -> str:
    """The fastest path the CPU's flags allow."""
    return next(path for path in reversed(PATHS) if cpu.has(*PATH_FLAGS[path]))


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels take this head dim (else the caller keeps SDPA)."""
    return 0 < head_dim <= 256 and head_dim % 32 == 0


def reference_prefill_attention(
    qkv: torch.Tensor, tokens: int, num_heads: int, num_kv_heads: int, scale: float
) -> torch.Tensor:
    """Causal GQA attention in float64 over the same (bf16) values: qkv [>= tokens, (H + 2 KV) * D]
    -> [tokens, H * D] float64. The self-check's and the tests' reference."""
    rows = qkv[:tokens].double()
    head_dim = rows.shape[1] // (num_heads + 2 * num_kv_heads)
    heads = rows[:, : (num_heads + 2 * num_kv_heads) * head_dim].view(tokens, -1, head_dim).transpose(0, 1)
    q, k, v = heads[:num_heads], heads[num_heads : num_heads + num_kv_heads], heads[num_heads + num_kv_heads :]
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) * scale
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1).reshape(tokens, num_heads * head_dim)


class PrefillKernels:
    """ctypes front of csrc/prefill_attention.c, bound to one path."""

    def __init__(self, library: ctypes.CDLL, path: str) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
        self._library = library
        self.path = path
        self.path_code = PATHS.index(path)
        p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._paths = _declare(library.prefill_attention_paths, c)
        self._threads = _declare(library.prefill_attention_threads, c)
        self._scratch_bytes = _declare(library.prefill_attention_scratch_bytes, i, c, i, c, c, c)
        self.function = _declare(library.prefill_attention_bf16, c, c, p, i, i, c, c, c, ctypes.c_float, p, i, p, i)

    def runnable_paths(self) -> tuple[str, ...]:
        """The paths this machine runs (cpuid and the AMX tile permission, as the C runtime sees them)."""
        bits = self._paths()
        return tuple(path for index, path in enumerate(PATHS) if bits >> index & 1)

    def with_path(self, path: str) -> PrefillKernels:
        return PrefillKernels(self._library, path)

    def scratch_bytes(self, tokens: int, num_kv_heads: int, head_dim: int) -> int:
        """Scratch bytes of a call of that shape on every OpenMP thread."""
        return int(self._scratch_bytes(self.path_code, tokens, num_kv_heads, head_dim, self._threads()))

    def scratch(self, tokens: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """A new scratch buffer for calls of that shape on every thread, 64-byte aligned (uint8)."""
        return _aligned(self.scratch_bytes(tokens, num_kv_heads, head_dim))

    def attend(
        self,
        qkv: torch.Tensor,
        tokens: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        out: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of qkv's first ``tokens`` rows ([>= tokens, >= (H + 2 KV) * D] bf16, unit
        column stride; q, k, v of each head in its first (H + 2 KV) * D columns) into out ([tokens, H * D]
        bf16, unit column stride; None: a new tensor). scratch: from ``scratch`` for this shape (None: a
        new one). Returns out."""
        width = (num_heads + 2 * num_kv_heads) * head_dim
        if (
            qkv.dtype != torch.bfloat16
            or qkv.dim() != 2
            or qkv.shape[0] < tokens
            or qkv.shape[1] < width
            or qkv.stride(1) != 1
        ):
            raise ValueError(f"qkv must be [>= {tokens}, >= {width}] bf16 rows with unit column stride")
        if out is None:
            out = torch.empty(tokens, num_heads * head_dim, dtype=torch.bfloat16)
        elif out.dtype != torch.bfloat16 or tuple(out.shape) != (tokens, num_heads * head_dim) or out.stride(1) != 1:
            raise ValueError(f"out must be [{tokens}, {num_heads * head_dim}] bf16 with unit column stride")
        if scratch is None:
            scratch = self.scratch(tokens, num_kv_heads, head_dim)
        status = self.function(
            self.path_code,
            qkv.data_ptr(),
            qkv.stride(0),
            tokens,
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
            out.data_ptr(),
            out.stride(0),
            scratch.data_ptr(),
            scratch.numel(),
        )
        if status:
            raise RuntimeError(f"prefill attention ({self.path}) failed with status {status}: {_STATUS.get(status)}")
        return out


def _aligned(size: int) -> torch.Tensor:
    """size bytes (uint8) starting on a 64-byte boundary."""
    raw = torch.empty(size + 64, dtype=torch.uint8)
    return raw[-raw.data_ptr() % 64 :][:size]


_LOCAL = threading.local()


def thread_scratch(size: int) -> torch.Tensor:
    """This thread's scratch of at least size bytes, kept and grown across calls: a step binds a new
    NativeFreshPrefill, and a new buffer per step (~160 KB at 128 tokens) would be page faults each step.
    Per thread, because the ctypes call releases the GIL."""
    buffer: torch.Tensor | None = getattr(_LOCAL, "scratch", None)
    if buffer is None or buffer.numel() < size:
        buffer = _LOCAL.scratch = _aligned(size)
    return buffer


def self_check(kernels: PrefillKernels) -> None:
    """The path against the float64 reference: GQA 2, 37 tokens (a partial tile), head dims 64 and 128."""
    gen = torch.Generator().manual_seed(0)
    for head_dim in (64, 128):
        qkv = torch.randn(40, 8 * head_dim, generator=gen).bfloat16()
        got = kernels.attend(qkv, 37, 4, 2, head_dim, head_dim**-0.5).double()
        error = (got - reference_prefill_attention(qkv, 37, 4, 2, head_dim**-0.5)).abs().max().item()
        if not error <= 2e-2:
            raise RuntimeError(
                f"self-check of the {kernels.path} prefill attention (head dim {head_dim}) failed: {error:.3g}"
            )


def build_and_check(march: str, cache_dir: str | Path | None = None, path: str | None = None) -> PrefillKernels:
    """Compile for -march=<march> (cached), load, bind to path (None: the fastest this CPU runs) and
    check; raises on any failure."""
    library = ctypes.CDLL(str(_build(march, _resolve_cache_dir(cache_dir), sources=SOURCES, flags=FLAGS, stem=STEM)))
    kernels = PrefillKernels(library, PATHS[0])
    runnable = kernels.runnable_paths()
    if path is not None and path not in runnable:
        raise RuntimeError(f"this CPU cannot run the {path} prefill attention (it runs {', '.join(runnable)})")
    kernels = kernels.with_path(path or runnable[-1])
    self_check(kernels)
    return kernels


@functools.cache
def _load_once(cache_dir: Path) -> PrefillKernels | Exception:
    try:
        return build_and_check("native", cache_dir)
    except Exception as exc:  # noqa: BLE001 - the caller reports it and keeps SDPA
        return exc


def load_prefill_kernels(cache_dir: str | Path | None = None) -> PrefillKernels | None:
    """The kernels on this CPU's fastest path (built and checked once per process), or None (logged once)
    when they cannot be had."""
    loaded = _load_once(_resolve_cache_dir(cache_dir))
    if isinstance(loaded, Exception):
        _warn_once(str(loaded))
        return None
    return loaded


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("native prefill attention unavailable, keeping SDPA: %s", reason)


class NativeFreshPrefill:
    """attention.FreshPrefill (same constructor and call) on the native kernel: bf16 qkv rows, a head
    dim it takes and a library that built and passed its check (by default: on its AMX path only);
    anything else is FreshPrefill's SDPA.
    The output matches SDPA's to bf16 rounding, not bit for bit (another order of summation).

    The scratch (packed K / V, per-thread scores) is the calling thread's (thread_scratch), kept across
    steps and layers."""

    __slots__ = ("_dim", "_fallback", "_heads", "_kernels", "_kv_heads", "_scale", "_scratch", "_tokens")

    def __init__(
        self,
        tokens: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        kernels: PrefillKernels | None = None,
    ) -> None:
        """kernels: the kernels to run (any path: the engine passes its plan's, KernelPlan.prefill, the AMX
        path where it beats SDPA); None, or a head dim they do not take: FreshPrefill's SDPA."""
        self._tokens, self._heads, self._kv_heads, self._scale = tokens, num_heads, num_kv_heads, scale
        self._dim = head_dim
        self._fallback = FreshPrefill(tokens, num_heads, num_kv_heads, head_dim, scale)
        self._kernels = kernels if supports_head_dim(head_dim) else None
        self._scratch = 0 if self._kernels is None else self._kernels.scratch_bytes(tokens, num_kv_heads, head_dim)

    @property
    def native(self) -> bool:
        """Whether bf16 calls run the native kernel."""
        return self._kernels is not None

    def __call__(self, qkv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """qkv: [>= tokens, (H + 2 KV) * D] rows, q and k rotated -> [tokens, H * D] (out, or a new tensor)."""
        kernels = self._kernels
        if kernels is None or qkv.dtype != torch.bfloat16:
            result = self._fallback(qkv)
            return result if out is None else out.copy_(result)
        return kernels.attend(
            qkv, self._tokens, self._heads, self._kv_heads, self._dim, self._scale, out, thread_scratch(self._scratch)
        )
