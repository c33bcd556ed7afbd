"""The native linear kernel on GGUF block weights (csrc/qlinear.c): build, check, call.

One library holds every path (AMX int8, AVX-512 VNNI, AVX2 + AVX-VNNI, AVX2,
portable C), each compiled for its instruction set by function attributes, so
which one runs is decided at run time, from the CPU's flags (``path_for``), not
by the -march the library was built with. The AMX path runs tiles from
``amx_min_rows`` activation rows on and the AVX-512 VNNI code below that, where a
16-row tile would be mostly padding.

Two variants of the product: ``int8`` (the default) quantizes the activations to
int8 per block of 32 and sums integers; ``float`` keeps them in float and
dequantizes the weights in registers (exact weights, no activation rounding),
except with bf16 activations on AMX tiles (amx_int8 path, from amx_min_rows rows),
where the weights are rounded to bf16 as a bf16 float matmul's are. ``auto`` is
``float`` where that AMX-BF16 kernel runs and ``int8`` everywhere else (few rows,
float32, other paths): the fastest of the two at every batch size. It is compiled on first use like the other kernels
(native.py: cached per source, flags and CPU), checked against the torch
reference of quantized.py on small inputs, and the caller falls back to float
weights with a warning when anything fails.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.engine.model.cpu import CpuFeatures
from services.engine.model.native import _build, _declare, _resolve_cache_dir
from services.engine.model.quantized import BLOCK, KIND_CODES, QuantizedMatrix, reference_linear

log = logging.getLogger(__name__)

# One library from several files, split by instruction set (csrc/qlinear.h: what they share;
# native_build hashes csrc/*.h into the cache key with the sources).
SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "qlinear.c",
        "qlinear_portable.c",
        "qlinear_avx2.c",
        "qlinear_avx512.c",
        "qlinear_amx.c",
        "qlinear_amxbf.c",
    )
]
# No -ffast-math: the activations' int8 rounding must equal the torch reference's.
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# Path names in the library's order (qlinear.c: PATH_*), slowest first.
PATHS = ("portable", "avx2", "avx2_vnni", "avx512_vnni", "amx_int8")
# The CPU flags each path needs (/proc/cpuinfo names).
PATH_FLAGS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx2_vnni": ("avx2", "fma", "f16c", "avx_vnni"),
    "avx512_vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "amx_int8": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"),
}
VARIANTS = ("int8", "float", "auto")
# Rows of a weight panel (csrc/qlinear.h: PANEL): the fused SwiGLU pairs whole gate and up panels.
SWIGLU_PANEL = 16
# From this many activation rows on the amx_int8 path uses tiles (measured: see docs/engine.md).
AMX_MIN_ROWS = 16


def path_for(cpu: CpuFeatures) -> str:
    """The fastest path the CPU's flags allow."""
    return next(path for path in reversed(PATHS) if cpu.has(*PATH_FLAGS[path]))


class ActivationScratch:
    """The prepared activations of the quantized linears (int8 values and scales, or float32), one
    growing buffer per dtype, reused across calls: a call's addresses stay valid until a larger take."""

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A flat tensor of at least numel elements of dtype (contents left over)."""
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[dtype] = torch.empty(max(numel, 1), dtype=dtype)
        return buffer


@dataclass(frozen=True, slots=True)
class LinearCall:
    """What QuantKernels runs for a call of ``rows`` activation rows: the C entry point (qlinear, or
    qlinear_float for float activations), the path it runs on, and the scratch it needs. Shared by
    QuantKernels.linear and the step's bound linears (layer_step.StepLinears), so the rules live here."""

    function: Callable[..., int]
    path: str
    rows: int
    float_activations: bool
    padded_rows: int  # the rows the int8 activations are packed to (the kernel's own count)
    path_code: int  # PATHS.index(path), the C call's first argument: looked up once, not per call
    address: int  # the entry point's, for a native caller (step_program.c)

    def scratch_sizes(self, cols: int, bf16: bool) -> tuple[tuple[torch.dtype, int], ...]:
        """(dtype, elements) of each scratch argument, in the call's order, for ``cols`` columns."""
        if self.float_activations:
            # Only bf16 activations use it (widened, or a padded 16-row tail for tiles).
            return ((torch.float32, max(self.rows, 16) * cols if bf16 else 0),)
        values = self.padded_rows * cols
        return ((torch.int8, values), (torch.float32, values // BLOCK * 2))


def _address(function: _ctypes.CFuncPtr) -> int:
    """A ctypes function's entry point address."""
    return ctypes.cast(function, ctypes.c_void_p).value or 0


def raise_for_status(status: int, path: str, rows: int, cols: int, outputs: int) -> None:
    """A qlinear call's status as the caller's error: 0 is success, -3 a failed scratch allocation."""
    if status == 0:
        return
    if status == -3:
        raise MemoryError(
            f"quantized linear ({path}, {rows} x {cols} activations, {outputs} outputs): "
            "the kernel could not allocate its scratch memory"
        )
    reason = "this CPU cannot run it" if status == -2 else "bad arguments"
    raise RuntimeError(f"quantized linear ({path}) failed with status {status}: {reason}")


class QuantKernels:
    """ctypes front of csrc/qlinear.c, bound to one path."""

    def __init__(
        self, library: ctypes.CDLL, path: str, variant: str = "int8", amx_min_rows: int = AMX_MIN_ROWS
    ) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self._library = library
        self.path = path
        self.variant = variant
        self.amx_min_rows = amx_min_rows
        p, i = ctypes.c_void_p, ctypes.c_int64
        self._paths = _declare(library.qlinear_paths, ctypes.c_int)
        self._padded_rows = _declare(library.qlinear_padded_rows, i, i)
        # Fixed for the process (cpuid, and the kernel's leave to use the tiles): asked once here,
        # not on every call of the engine's step.
        self._float_tiles = bool(_declare(library.qlinear_float_tiles, ctypes.c_int)())
        args = (ctypes.c_int, p, i, ctypes.c_int, i, i, p, i, ctypes.c_int, p, p, i, p, i, ctypes.c_int, p, p)
        self._linear = _declare(library.qlinear, ctypes.c_int, *args)
        self._linear_float = _declare(library.qlinear_float, ctypes.c_int, *args[:-1])
        # SwiGLU in the epilogue (csrc/qlinear.h): the same arguments, out [rows, rows of w / 2].
        self._swiglu = _declare(library.qlinear_swiglu, ctypes.c_int, *args)
        self._swiglu_float = _declare(library.qlinear_float_swiglu, ctypes.c_int, *args[:-1])
        self._scratch = ActivationScratch()

    def runnable_paths(self) -> tuple[str, ...]:
        """The paths this machine can run (cpuid, as the C runtime sees it)."""
        bits = self._paths()
        return tuple(path for index, path in enumerate(PATHS) if bits >> index & 1)

    def rounds_weights_to_bf16(self, tokens: int, dtype: torch.dtype) -> bool:
        """Whether a call computes on bf16-rounded weights: float activations on AMX-BF16 tiles
        (bf16 activations, amx_int8 path, amx_min_rows rows or more), as a bf16 float matmul would."""
        return (
            self.variant in ("float", "auto")
            and self.path == "amx_int8"
            and dtype == torch.bfloat16
            and tokens >= self.amx_min_rows
            and self._float_tiles
        )

    def variant_for(self, tokens: int, dtype: torch.dtype) -> str:
        """The product a call of that many rows computes: "int8" or "float" activations."""
        if self.variant == "auto":
            return "float" if self.rounds_weights_to_bf16(tokens, dtype) else "int8"
        return self.variant

    def call_for(self, rows: int, dtype: torch.dtype, swiglu: bool = False) -> LinearCall:
        """The entry point, path and scratch of a call of ``rows`` rows of ``dtype`` activations:
        amx_int8 runs its tiles from amx_min_rows rows, avx512_vnni below. swiglu: the entry point
        that writes silu(gate) * up of a gate_up weight instead of its output (``swiglu``)."""
        path = "avx512_vnni" if self.path == "amx_int8" and rows < self.amx_min_rows else self.path
        if self.variant_for(rows, dtype) == "float":
            function = self._swiglu_float if swiglu else self._linear_float
            return LinearCall(function, path, rows, True, rows, PATHS.index(path), _address(function))
        function = self._swiglu if swiglu else self._linear
        return LinearCall(function, path, rows, False, self._padded_rows(rows), PATHS.index(path), _address(function))

    def with_path(self, path: str) -> QuantKernels:
        return QuantKernels(self._library, path, self.variant, self.amx_min_rows)

    def with_variant(self, variant: str) -> QuantKernels:
        return QuantKernels(self._library, self.path, variant, self.amx_min_rows)

    def with_amx_min_rows(self, rows: int) -> QuantKernels:
        return QuantKernels(self._library, self.path, self.variant, rows)

    @property
    def activations(self) -> str:
        """What the activations are multiplied as, for the plan's log."""
        if self.variant == "auto":
            return f"int8 activations (float on AMX-BF16 tiles: bf16, {self.amx_min_rows}+ rows)"
        return f"{self.variant} activations"

    def describe(self) -> str:
        """'amx_int8 kernel' or 'avx512_vnni kernel, float activations'."""
        if self.variant == "auto":
            return f"{self.path} kernel, float activations on AMX-BF16 tiles where they run (bf16, {self.amx_min_rows}+ rows)"
        return f"{self.path} kernel" + (", float activations" if self.variant == "float" else "")

    @staticmethod
    def fuses_swiglu(weight: QuantizedMatrix) -> bool:
        """Whether ``swiglu`` takes this gate_up weight: whole 16-row panels of gate and of up
        (its rows a multiple of 32), on every path. Otherwise: ``linear`` then a separate silu_mul."""
        return weight.rows > 0 and weight.rows % (2 * SWIGLU_PANEL) == 0

    def swiglu(
        self,
        x: torch.Tensor,
        weight: QuantizedMatrix,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """silu(gate) * up of gate_up = bias + x @ weight.T, whose first half of columns is gate and
        second up (weight: [2 * inter, cols], gate then up; bias: float32 [2 * inter]), from the
        kernel's epilogue: no [T, 2 * inter] output and no second pass. For bf16 output the same
        bits as ``linear`` into bf16 then layers.c's silu_mul on the same instruction set (gate and
        up rounded to bf16 first); float32 output unrounded. x, out: as ``linear``, out [T, inter].
        Raises ValueError unless ``fuses_swiglu(weight)``."""
        if not self.fuses_swiglu(weight):
            raise ValueError(f"the fused SwiGLU takes a gate_up of a multiple of 32 rows, not {weight.rows}")
        return self._run(x, weight, bias, None, out, weight.rows // 2, swiglu=True)

    def linear(
        self,
        x: torch.Tensor,
        weight: QuantizedMatrix,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual + bias + x @ weight.T. x: [T, cols] float32 or bfloat16 (rows may be strided);
        bias: float32 [rows]; residual: [T, rows] (converted to the output's dtype if it differs).
        out: where to write the [T, rows] result (rows may be strided, stride(1) == 1), in x's dtype or
        float32 (bf16 x: the sums stored unrounded; the kernel's output format is its own flag);
        None: a new tensor in x's dtype. Returns the output."""
        return self._run(x, weight, bias, residual, out, weight.rows, swiglu=False)

    def _run(
        self,
        x: torch.Tensor,
        weight: QuantizedMatrix,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        out: torch.Tensor | None,
        width: int,
        swiglu: bool,
    ) -> torch.Tensor:
        """linear (width: weight.rows) or swiglu (weight.rows / 2): out [T, width]."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the quantized linear takes float32 or bfloat16 activations, not {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        tokens, cols = x.shape
        if cols != weight.cols:
            raise ValueError(f"x has {cols} columns, the weight {weight.cols}")
        if out is None:
            out = torch.empty(tokens, width, dtype=x.dtype)
        else:
            _check_out(out, tokens, width, x.dtype)
        if residual is not None and (residual.dtype != out.dtype or residual.stride(1) != 1):
            residual = residual.to(out.dtype).contiguous()
        bf16 = x.dtype == torch.bfloat16
        call = self.call_for(tokens, x.dtype, swiglu)
        scratch = tuple(self._scratch.take(dtype, numel).data_ptr() for dtype, numel in call.scratch_sizes(cols, bf16))
        status = call.function(
            call.path_code,
            x.data_ptr(),
            x.stride(0),
            int(bf16),
            tokens,
            cols,
            weight.data.data_ptr(),
            weight.rows,
            KIND_CODES[weight.kind],
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            out.data_ptr(),
            out.stride(0),
            int(out.dtype == torch.bfloat16),
            *scratch,
        )
        raise_for_status(status, call.path, tokens, cols, weight.rows)
        return out


def _check_out(out: torch.Tensor, tokens: int, rows: int, dtype: torch.dtype) -> None:
    """out= of QuantKernels.linear: [tokens, rows] on the CPU, unit column stride, x's dtype or float32."""
    if out.dim() != 2 or tuple(out.shape) != (tokens, rows):
        raise ValueError(f"out must be [{tokens}, {rows}], not {list(out.shape)}")
    if out.dtype not in (dtype, torch.float32):
        raise ValueError(f"out must be {dtype} (x's dtype) or torch.float32, not {out.dtype}")
    if out.device.type != "cpu":
        raise ValueError(f"out must be on the CPU, not {out.device}")
    if tokens and rows > 1 and out.stride(1) != 1:
        raise ValueError(f"out's rows must be contiguous (stride(1) == 1), not stride {out.stride()}")
    if tokens > 1 and out.stride(0) < rows:
        raise ValueError(f"out's rows overlap (stride(0) {out.stride(0)} < {rows})")


def random_matrix(kind: str, rows: int, cols: int, generator: np.random.Generator) -> QuantizedMatrix:
    """A random weight quantized by the gguf package itself (tests, self-check)."""
    from gguf import GGMLQuantizationType, quantize

    weights = generator.standard_normal((rows, cols)).astype(np.float32)
    # Some blocks with an outlier and one all-zero block: scales far apart and zero.
    weights[:, :BLOCK] *= 8
    weights[0, :BLOCK] = 0
    return QuantizedMatrix.from_gguf_blocks(kind, quantize(weights, GGMLQuantizationType[kind]), cols)


def self_check(kernels: QuantKernels) -> None:
    """The kernel against quantized.reference_linear: every kind, both dtypes, tails, residual and bias;
    the int8 and float variants with tiles on every row count (amx_int8), and the kernels as bound."""
    _check(kernels.with_variant("int8").with_amx_min_rows(1))
    _check(kernels.with_variant("float").with_amx_min_rows(1))
    _check(kernels)


def _check(kernels: QuantKernels) -> None:
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for kind in KIND_CODES:
        weight = random_matrix(kind, 40, 96, rng)  # 2.5 panels, 3 blocks
        bias = torch.randn(40, generator=gen)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            for tokens in (1, 11):
                x = torch.randn(tokens, 96, generator=gen).to(dtype)
                residual = torch.randn(tokens, 40, generator=gen).to(dtype)
                got = kernels.linear(x, weight, bias, residual).double()
                bf16_weights = kernels.rounds_weights_to_bf16(tokens, dtype)
                variant = kernels.variant_for(tokens, dtype)
                want = reference_linear(x, weight, variant, bf16_weights) + bias.double() + residual.double()
                error = ((got - want).abs() / (1 + want.abs())).max().item()
                if not error <= tol:
                    raise RuntimeError(
                        f"self-check of the {kernels.describe()} quantized linear ({kind}, {dtype}, {tokens} rows) "
                        f"failed: error {error:.3g}"
                    )
                _check_swiglu(kernels, kind, x, gen)


def _check_swiglu(kernels: QuantKernels, kind: str, x: torch.Tensor, gen: torch.Generator) -> None:
    """The fused SwiGLU against silu(gate) * up of the plain kernel's float32 sums (the same sums)."""
    weight = random_matrix(kind, 64, x.shape[1], np.random.default_rng(1))  # 2 panel pairs
    bias = torch.randn(64, generator=gen)
    sums = kernels.linear(x, weight, bias, out=torch.empty(x.shape[0], 64))
    want = torch.nn.functional.silu(sums[:, :32]) * sums[:, 32:]
    got = kernels.swiglu(x, weight, bias, out=torch.empty(x.shape[0], 32))
    error = ((got - want).abs() / (1 + want.abs())).max().item()
    if not error <= 1e-5:
        raise RuntimeError(
            f"self-check of the {kernels.describe()} fused SwiGLU ({kind}, {x.dtype}, {x.shape[0]} rows) "
            f"failed: error {error:.3g}"
        )


def build_and_check(march: str, path: str, cache_dir: str | Path | None = None) -> QuantKernels:
    """Compile for -march=<march> (cached), load, bind to path and check; raises on any failure."""
    library = ctypes.CDLL(
        str(_build(march, _resolve_cache_dir(cache_dir), sources=SOURCES, flags=FLAGS, stem="scalellm_qlinear"))
    )
    kernels = QuantKernels(library, path)
    runnable = kernels.runnable_paths()
    if path == "amx_int8" and path not in runnable and "avx512_vnni" in runnable:
        # The flags were there but the kernel refused the tile state (arch_prctl): the next path.
        log.warning("the CPU has AMX but this process may not use it: the avx512_vnni quantized linear")
        kernels = kernels.with_path("avx512_vnni")
    elif path not in runnable:
        raise RuntimeError(f"this CPU cannot run the {path} path (it runs {', '.join(runnable)})")
    self_check(kernels)
    return kernels


@functools.cache
def _load_once(path: str, cache_dir: Path) -> QuantKernels | Exception:
    try:
        return build_and_check("native", path, cache_dir)
    except Exception as exc:  # noqa: BLE001 - the caller reports it and falls back
        return exc


def load_quant_kernels(path: str, cache_dir: str | Path | None = None) -> QuantKernels | Exception:
    """The kernels bound to path (built once per process), or the failure to report."""
    return _load_once(path, _resolve_cache_dir(cache_dir))
