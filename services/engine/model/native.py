"""Optional native CPU kernels (csrc/*.c): paged decode attention, fused layer steps, bf16 linears.

Plain torch has no "attend over these scattered blocks" op, so the torch path
gathers every decode sequence's K/V into a padded copy each layer; at 64
sequences that copy costs about as much as all the matmuls. The C kernel reads
the pool in place. The bfloat16 layer kernels (RMSNorm, RoPE + KV store,
SiLU-and-multiply) replace 3-12 small torch ops each, whose dispatch cost is a
large share of a decode step at this model size. The bf16 linear multiplies
bf16 weights on CPUs without bf16 arithmetic (AVX2 + FMA), widening them in
registers, where torch would need a float32 copy of every weight per call.

One library holds every code path (AVX-512, AVX2 + FMA, portable C; csrc/simd.h);
a ``NativeKernels`` is bound to one, chosen from the CPU's flags (``path_for``)
by the kernel plan, so an AVX-512 machine can run and test what an AVX2 one runs.

They are compiled on first use with the system C compiler (a few seconds,
cached per source and CPU), loaded with ctypes (which releases the GIL), and
every path this CPU runs is checked against torch on small inputs before they
are trusted. Without a compiler, or if anything fails, the engine logs why and
uses plain torch.

SCALELLM_KERNELS=torch turns them off; =native makes their absence an error
(the setting reaches here through the kernel plan, plan.py). Compiled kernels
are kept in SCALELLM_KERNEL_CACHE_DIR (default: default_cache_dir()).
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal, get_args

import torch

from services.engine.model.cpu import CpuFeatures
from services.engine.model.reference import apply_rope, reference_decode_attention, rms_norm, silu_mul

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.c", "layers.c", "bf16_linear.c")]
FLAGS = ["-O3", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# Each kernel holds every path, compiled for its instruction set by function
# attributes (csrc/simd.h); -march only decides what the portable path may use.
# "native" is this CPU; tests build for other targets too, e.g. x86-64-v3 (AVX2 + FMA).
DEFAULT_MARCH = "native"
# Path names in the kernels' order (simd.h: PATH_*), slowest first, with the CPU
# flags (/proc/cpuinfo names) each needs.
PATHS = ("portable", "avx2", "avx512")
PATH_FLAGS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("avx2", "fma", "f16c"),  # f16c: the fp8 e5m2 KV loads
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
# SCALELLM_KERNELS (shared/settings.py declares the same choices without importing torch).
KernelChoice = Literal["auto", "torch", "native"]
KERNEL_CHOICES: tuple[str, ...] = get_args(KernelChoice)
_COMPILE_TIMEOUT_S = 120
# bf16_linear.c: output rows per weight panel.
PANEL = 16


_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def path_for(cpu: CpuFeatures) -> str:
    """The fastest kernel path the CPU's flags allow."""
    return next(path for path in reversed(PATHS) if cpu.has(*PATH_FLAGS[path]))


def _declare(fn: _ctypes.CFuncPtr, restype: type | None, *argtypes: type) -> _ctypes.CFuncPtr:
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weight [n, k] -> the panels bf16_linear reads: [ceil(n / 16), k, 8, 2], element
    [p, j, i, half] = weight[16 p + 8 half + i, j] (zero rows past n)."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.nn.functional.pad(weight.to(torch.bfloat16), (0, 0, 0, panels * PANEL - n))
    return padded.view(panels, 2, PANEL // 2, k).permute(0, 3, 2, 1).contiguous()


class NativeKernels:
    """ctypes front of the compiled kernels, bound to one path (``PATHS``). Tensors
    must live on the CPU; each method states the layout it needs."""

    def __init__(self, library: ctypes.CDLL, path: str = "portable") -> None:
        if path not in PATHS:
            raise ValueError(f"unknown kernel path {path!r}; expected one of {', '.join(PATHS)}")
        self._library = library
        self.path = path
        self._code = PATHS.index(path)
        self._paths = _declare(library.native_paths, _C)
        self._attention = _declare(
            library.paged_decode_attention, _C, _C, _C, _C, _P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _F
        )
        self._rms_norm = _declare(library.rms_norm_bf16, None, _C, _P, _I, _P, _P, _I, _I, _F)
        self._rope_store = _declare(
            library.rope_store_bf16, None, _C, _P, _I, _P, _P, _P, _P, _C, _P, _P, _I, _I, _I, _I, _I
        )
        self._silu_mul = _declare(library.silu_mul_bf16, None, _C, _P, _P, _I, _I)
        self._linear = _declare(library.bf16_linear, _C, _C, _P, _I, _C, _I, _I, _P, _I, _P, _P, _I, _P, _I, _C, _P)
        self._unpack = _declare(library.bf16_unpack_f32, None, _C, _P, _I, _I, _P)
        self._scratch = torch.empty(0, dtype=torch.float32)

    def runnable_paths(self) -> tuple[str, ...]:
        """The paths this machine can run (cpuid, as the C runtime sees it)."""
        bits = self._paths()
        return tuple(path for index, path in enumerate(PATHS) if bits >> index & 1)

    def with_path(self, path: str) -> NativeKernels:
        """The same library bound to another path; raises if this CPU cannot run it."""
        if path not in self.runnable_paths():
            raise RuntimeError(f"this CPU cannot run the {path} kernels (it runs {', '.join(self.runnable_paths())})")
        return NativeKernels(self._library, path)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """bfloat16 x: [T, dim] (rows may be strided), weight: [dim] -> [T, dim]."""
        rows, dim = x.shape
        if x.stride(1) != 1:
            raise ValueError("rms_norm needs contiguous rows")
        out = torch.empty(rows, dim, dtype=x.dtype)
        self._rms_norm(self._code, x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps)
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
    ) -> None:
        """Rotate q and k in place in bfloat16 qkv [T, (H + 2 KV) * D] (contiguous), and
        store k, v at slots [T] in the caches (k [blocks, KV, D, block_size],
        v [blocks, KV, block_size, D]; both bfloat16 or both float8_e5m2, rounded from
        the rotated bf16 k). positions, slots: int64 [T]; cos, sin: float32 [max_positions, D / 2]."""
        _, num_kv_heads, block_size, head_dim = v_cache.shape
        if not qkv.is_contiguous():
            raise ValueError("rope_store needs a contiguous qkv tensor")
        if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.bfloat16, torch.float8_e5m2):
            raise ValueError(f"rope_store stores into a bfloat16 or float8_e5m2 pool, not {k_cache.dtype}")
        self._rope_store(
            self._code,
            qkv.data_ptr(),
            qkv.stride(0),
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            _FORMATS[k_cache.dtype],
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            qkv.shape[0],
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """bfloat16 gate_up: [T, 2 * inter] contiguous -> silu(gate) * up: [T, inter]."""
        rows, width = gate_up.shape
        if not gate_up.is_contiguous():
            raise ValueError("silu_mul needs a contiguous input")
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(self._code, gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, H, D] (rows may be strided, D contiguous); k_cache: [blocks, KV, D, block_size],
        v_cache: [blocks, KV, block_size, D], both contiguous, in q's dtype (float32 or
        bfloat16) or float8_e5m2 (the 8-bit KV cache); block_table: [B, max_blocks] int64;
        context_lens: [B] int64. Returns [B, H * D] in q's dtype."""
        batch, num_heads, head_dim = q.shape
        if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("native attention needs contiguous head rows and a contiguous pool")
        if (
            q.dtype not in (torch.float32, torch.bfloat16)
            or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (q.dtype, torch.float8_e5m2)
        ):
            raise ValueError(
                f"native attention takes float32 or bfloat16 q with a pool in q's dtype or float8_e5m2, not "
                f"{q.dtype}/{k_cache.dtype}/{v_cache.dtype}"
            )
        out = q.new_empty(batch, num_heads * head_dim)
        status = self._attention(
            self._code,
            _FORMATS[q.dtype],
            _FORMATS[k_cache.dtype],
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
            v_cache.shape[1],
            head_dim,
            v_cache.shape[2],
            scale,
        )
        if status != 0:
            raise RuntimeError(
                f"native attention ({self.path}) failed (status {status}: head_dim or group too large, "
                "out of memory, or a path this CPU cannot run)"
            )
        return out

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual + bias + x @ weight.T on a weight packed by ``pack_bf16_weight``.
        x: [T, in] float32 or bfloat16 (rows may be strided); bias: float32 [out];
        residual: [T, out] in x's dtype. Returns [T, out] in x's dtype."""
        if x.dtype not in _FORMATS:
            raise ValueError(f"the bf16 linear takes float32 or bfloat16 activations, not {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        tokens, cols = x.shape
        if cols != packed.shape[1]:
            raise ValueError(f"x has {cols} columns, the weight {packed.shape[1]}")
        if residual is not None and (residual.dtype != x.dtype or residual.stride(1) != 1):
            residual = residual.to(x.dtype).contiguous()
        bf16 = int(x.dtype == torch.bfloat16)
        if bf16 and self._scratch.numel() < tokens * cols:
            self._scratch = torch.empty(tokens * cols, dtype=torch.float32)
        out = torch.empty(tokens, out_features, dtype=x.dtype)
        status = self._linear(
            self._code,
            x.data_ptr(),
            x.stride(0),
            bf16,
            tokens,
            cols,
            packed.data_ptr(),
            out_features,
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            out.data_ptr(),
            out.stride(0),
            bf16,
            self._scratch.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"bf16 linear ({self.path}) failed with status {status}")
        return out

    def unpack_into(self, packed: torch.Tensor, out_features: int, out: torch.Tensor) -> torch.Tensor:
        """The packed weight as float32 [out_features, in] written into out (contiguous, at least that big)."""
        cols = packed.shape[1]
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < out_features * cols:
            raise ValueError("unpack_into needs a contiguous float32 buffer of the weight's size")
        self._unpack(self._code, packed.data_ptr(), out_features, cols, out.data_ptr())
        return out.view(-1)[: out_features * cols].view(out_features, cols)


# simd.h: FMT_*.
_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e5m2: 2}


def load_native_kernels(
    choice: str, cache_dir: str | Path | None = None, path: str | None = None
) -> NativeKernels | None:
    """The kernels for choice "auto" / "native", None for "torch" or when "auto" cannot have them.

    cache_dir: where compiled kernels are kept (None: default_cache_dir()); path: the
    code path to bind (``PATHS``; None: the fastest this CPU runs). A path this CPU
    cannot run is lowered to the fastest it can (planning for another CPU)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels choice {choice!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch":
        return None
    native = _load_once(_resolve_cache_dir(cache_dir))
    if isinstance(native, Exception):
        if choice == "native":
            raise RuntimeError(f"native kernels requested but unavailable: {native}") from native
        log.warning("native kernels unavailable, using plain torch: %s", native)
        return None
    runnable = native.runnable_paths()
    wanted = path or runnable[-1]
    if wanted not in runnable:
        lower = [p for p in runnable if PATHS.index(p) < PATHS.index(wanted)]
        log.warning("this CPU cannot run the %s kernels; using %s", wanted, lower[-1])
        wanted = lower[-1]
    return native.with_path(wanted)


@functools.cache
def _load_once(cache_dir: Path) -> NativeKernels | Exception:
    """Build, load and check once per process (and cache folder); the failure is kept to be reported."""
    try:
        return build_and_check(DEFAULT_MARCH, cache_dir)
    except Exception as exc:  # noqa: BLE001 - any failure only costs speed; the caller reports it
        return exc


def build_and_check(march: str, cache_dir: str | Path | None = None) -> NativeKernels:
    """Compile for ``-march=<march>`` (cached in cache_dir), load, and compare every path
    this CPU runs with torch; raises on any failure. Bound to the portable path."""
    native = NativeKernels(ctypes.CDLL(str(_build(march, _resolve_cache_dir(cache_dir)))))
    for path in native.runnable_paths():
        _self_check(native.with_path(path))
    return native


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/scalellm/kernels, or ~/.cache/scalellm/kernels."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "scalellm", "kernels").expanduser()


def _resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(
    march: str,
    cache_dir: Path,
    *,
    sources: list[Path] | None = None,
    flags: list[str] | None = None,
    stem: str = "scalellm_kernels",
) -> Path:
    """Compile (or find already compiled) the kernels; -march=native ties them to this CPU.

    sources, flags, stem: another library built the same way (quant_kernels.py); default these kernels."""
    sources = SOURCES if sources is None else sources
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    # The headers beside the sources count too: an edit there must rebuild.
    headers = sorted({header for source in sources for header in source.parent.glob("*.h")})
    texts = [source.read_text() for source in [*sources, *headers]]
    flags = [f"-march={march}", *(FLAGS if flags is None else flags)]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir / f"{stem}-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders each publish a whole file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, *map(str, sources), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled native kernels %s", target)
    return target


def _self_check(native: NativeKernels) -> None:
    """Compare every kernel of native's path with plain torch on small random inputs (reference.py)."""
    gen = torch.Generator().manual_seed(0)

    def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            raise RuntimeError(
                f"self-check of {name} ({native.path} path) failed: max error {(got.float() - want.float()).abs().max()}"
            )

    # Block size 4 takes the portable code on every path; 16 and 8 the vector code.
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for block_size, lens in ((4, [11, 3]), (16, [37, 16]), (8, [21, 1])):
            k_cache = torch.randn(8, 2, 64, block_size, generator=gen).to(dtype)
            v_cache = torch.randn(8, 2, block_size, 64, generator=gen).to(dtype)
            q = torch.randn(2, 6, 64, generator=gen).to(dtype)
            table = torch.tensor([[4, 1, 5], [2, 0, 0]])
            got = native.decode(q, k_cache, v_cache, table, torch.tensor(lens), 0.125)
            want = reference_decode_attention(q, k_cache, v_cache, table, torch.tensor(lens), 0.125, k_dim_major=True)
            check(f"decode attention ({dtype}, block size {block_size})", got, want, tol)
            # The 8-bit pool: the reference reads the same e5m2 values, widened.
            k8, v8 = k_cache.to(torch.float8_e5m2), v_cache.to(torch.float8_e5m2)
            got = native.decode(q, k8, v8, table, torch.tensor(lens), 0.125)
            want = reference_decode_attention(
                q, k8.float(), v8.float(), table, torch.tensor(lens), 0.125, k_dim_major=True
            )
            check(f"decode attention ({dtype}, fp8 e5m2 KV, block size {block_size})", got, want, tol)

    bf16 = torch.bfloat16
    x = torch.randn(3, 40, generator=gen).to(bf16)
    weight = torch.randn(40, generator=gen).to(bf16)
    check("rms_norm", native.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), 3e-2)
    gate_up = torch.randn(3, 40, generator=gen).to(bf16)
    check("silu_mul", native.silu_mul(gate_up), silu_mul(gate_up.float()), 3e-2)
    heads, kv_heads, dim = 4, 2, 24
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen).to(bf16)
    angles = torch.rand(10, dim // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    positions, slots = torch.tensor([7, 0, 9]), torch.tensor([5, 0, 2])
    k_cache = torch.zeros(2, kv_heads, dim, 4, dtype=bf16)
    v_cache = torch.zeros(2, kv_heads, 4, dim, dtype=bf16)
    rotated = apply_rope(
        qkv[:, : (heads + kv_heads) * dim].float().view(3, -1, dim), cos[positions][:, None], sin[positions][:, None]
    )
    values = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim).clone()
    native.rope_store(qkv, positions, cos, sin, slots, k_cache, v_cache, heads)
    check("rope", qkv[:, : (heads + kv_heads) * dim].view(3, -1, dim), rotated, 3e-2)
    for t, slot in enumerate(slots.tolist()):
        check("kv store", k_cache[slot // 4, :, :, slot % 4], rotated[t, heads:], 3e-2)
        check("kv store", v_cache[slot // 4, :, slot % 4], values[t], 0)
    # fp8 e5m2: exactly torch's rounding of the rotated bf16 k and of v (40 dims: vector code and tail).
    qkv = torch.randn(3, (heads + 2 * kv_heads) * 40, generator=gen).to(bf16)
    angles = torch.rand(10, 20, generator=gen)
    k8 = torch.zeros(2, kv_heads, 40, 4, dtype=torch.float8_e5m2)
    v8 = torch.zeros(2, kv_heads, 4, 40, dtype=torch.float8_e5m2)
    native.rope_store(qkv, positions, angles.cos(), angles.sin(), slots, k8, v8, heads)
    rows = qkv.view(3, -1, 40)  # q and k rotated in place
    for t, slot in enumerate(slots.tolist()):
        k_want = rows[t, heads : heads + kv_heads].to(torch.float8_e5m2)
        v_want = rows[t, heads + kv_heads :].to(torch.float8_e5m2)
        check("fp8 k store", k8[slot // 4, :, :, slot % 4].float(), k_want.float(), 0)
        check("fp8 v store", v8[slot // 4, :, slot % 4].float(), v_want.float(), 0)

    # 7 rows: a full tile of 6 and a tail; 37 outputs: two panels and a partial one; 28 columns: 3 x 8 + 4.
    weight = torch.randn(37, 28, generator=gen).to(bf16)
    packed, bias = pack_bf16_weight(weight), torch.randn(37, generator=gen)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = torch.randn(7, 28, generator=gen).to(dtype)
        residual = torch.randn(7, 37, generator=gen).to(dtype)
        want = residual.float() + bias + x.float() @ weight.float().T
        check(f"bf16 linear ({dtype})", native.linear(x, packed, 37, bias, residual), want, tol)
    unpacked = native.unpack_into(packed, 37, torch.empty(37 * 28))
    check("bf16 unpack", unpacked, weight, 0)
