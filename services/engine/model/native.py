"""The optional native decode-attention kernel (csrc/paged_attention.c).

Plain torch has no "attend over these scattered blocks" op, so the torch path
gathers every decode sequence's K/V into a padded copy each layer; at 64
sequences that copy costs about as much as all the matmuls. The C kernel reads
the pool in place. It is compiled on first use with the system C compiler
(about a second, cached per source and CPU), loaded with ctypes, and checked
against the torch path on a small input before it is trusted. Without a
compiler, or if anything fails, the engine logs why and uses the torch path.

SCALELLM_ATTENTION=torch turns it off; =native makes its absence an error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
ATTENTION_CHOICES = ("auto", "torch", "native")
_COMPILE_TIMEOUT_S = 120


class NativeAttention:
    """ctypes front of the compiled kernel; one call per layer for all decode sequences."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fns = {torch.float32: library.paged_decode_attention_f32, torch.bfloat16: library.paged_decode_attention_bf16}
        for fn in self._fns.values():
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64] * 5 + [ctypes.c_float]

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in self._fns

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, H, D] (rows may be strided, D contiguous); caches: [blocks, KV, block_size, D]
        contiguous; block_table: [B, max_blocks] int64; context_lens: [B] int64. Returns [B, H * D]."""
        batch, num_heads, head_dim = q.shape
        if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("native attention needs contiguous head rows and a contiguous pool")
        out = q.new_empty(batch, num_heads * head_dim)
        status = self._fns[q.dtype](
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_table.data_ptr(),
            block_table.shape[1],
            context_lens.data_ptr(),
            out.data_ptr(),
            batch,
            num_heads,
            k_cache.shape[1],
            head_dim,
            k_cache.shape[2],
            scale,
        )
        if status != 0:
            raise RuntimeError(f"native attention failed (status {status}: head_dim or group too large, or out of memory)")
        return out


def load_native_attention(choice: str) -> NativeAttention | None:
    """The kernel for choice "auto" / "native", None for "torch" or when "auto" cannot have it."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend {choice!r}; expected one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "torch":
        return None
    native = _load_once()
    if isinstance(native, Exception):
        if choice == "native":
            raise RuntimeError(f"native attention requested but unavailable: {native}") from native
        log.warning("native attention unavailable, using the torch path: %s", native)
        return None
    return native


@functools.cache
def _load_once() -> NativeAttention | Exception:
    """Build, load and check once per process; the failure is kept to be reported."""
    try:
        native = NativeAttention(ctypes.CDLL(str(_build())))
        _self_check(native)
    except Exception as exc:  # any failure here only costs speed: the caller reports it
        return exc
    return native


def _cache_dir() -> Path:
    root = os.environ.get("SCALELLM_KERNEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "scalellm", "kernels"
    )
    return Path(root).expanduser()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build() -> Path:
    """Compile (or find already compiled) the kernel; -march=native ties it to this CPU."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()
    target = _cache_dir() / f"paged_attention-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders each publish a whole file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled native attention kernel %s", target)
    return target


def _self_check(native: NativeAttention) -> None:
    """Compare with plain torch on a small random input, in both dtypes."""
    from services.engine.model.attention import reference_decode_attention

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        k_cache = torch.randn(6, 2, 4, 64, generator=gen).to(dtype)
        v_cache = torch.randn(6, 2, 4, 64, generator=gen).to(dtype)
        q = torch.randn(2, 6, 64, generator=gen).to(dtype)
        table = torch.tensor([[4, 1, 5], [2, 0, 0]])
        lens = torch.tensor([11, 3])
        got = native.decode(q, k_cache, v_cache, table, lens, 0.125)
        want = reference_decode_attention(q, k_cache, v_cache, table, lens, 0.125)
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            raise RuntimeError(f"self-check failed in {dtype}: max error {(got.float() - want.float()).abs().max()}")
